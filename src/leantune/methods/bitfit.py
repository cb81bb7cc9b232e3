"""BitFit (Ben Zaken et al. 2022): train only the bias terms of the base (plus a classification head).

Biases are ~0.1% of a BERT's weights, yet tuning them alone comes close to full fine-tuning on many
classification tasks. Inside blocks, only the blocks that still train after a `freeze` (or the blocks
`layers` names) get their biases trained; outside them, biases train unless `freeze` froze them (e.g.
the embeddings' LayerNorm). The model saves and reloads as a plain checkpoint. Llama-family models have
no biases: refused, pointing at `layernorm` or `lora`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from leantune.methods import _blocks
from leantune.methods.registry import MethodConfig, MethodContext, MethodSpec, register


class BitfitConfig(MethodConfig):
    name: Literal["bitfit"] = "bitfit"
    layers: list[int] | None = Field(
        None, description="Blocks whose biases train; null: every block still training after freeze."
    )


def is_bias(module_name: str, param_name: str, module) -> bool:
    return param_name == "bias"


def apply(model, cfg: BitfitConfig, ctx: MethodContext):
    names = _blocks.train_base_subset(
        model, "bitfit", ctx, cfg.layers, is_bias, "bias terms", "layernorm or lora"
    )
    object.__setattr__(model, "leantune_bitfit", names)
    return model


def report(model, cfg: BitfitConfig) -> dict[str, Any]:
    counts = _blocks.count_selected(model, getattr(model, "leantune_bitfit", []))
    return {**counts, "head": _blocks.own_counts(model, "head")["trainable"]}


SPEC = register(MethodSpec("bitfit", BitfitConfig, apply, report=report))
