"""Find the peft LoRA layers of a model and read their ranks and factors.

Read-only structure of an adapted model, below the methods because the memory planner prices these
sites (it must not import a method to do so) while `dynamic_rank` and friends resize them
(`leantune.methods._lora_ranks`, which re-exports these names). peft is imported lazily.
"""

from __future__ import annotations

from typing import Any

ADAPTER = "default"


def lora_layers(model) -> dict[str, Any]:
    """Every peft LoRA layer by its name in the base model (the names `rank_pattern` uses)."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}


def rank_of(layer, adapter: str = ADAPTER) -> int:
    return int(layer.lora_A[adapter].weight.shape[0]) if adapter in layer.lora_A else 0


def lora_factors(layer, adapter: str = ADAPTER):
    """(A [r x in], B [out x r]) parameters, or None at rank 0."""
    if adapter not in layer.lora_A:
        return None
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
