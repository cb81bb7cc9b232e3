"""LayerNorm tuning: train only the normalisation layers' weights (LayerNorm scale and shift, RMSNorm
scale) plus a classification head.

Norm weights are a tiny share of a model (two vectors per block), and re-scaling the normalised features
is a cheap, surprisingly strong way to adapt a pretrained model (e.g. Zhao et al. 2024, "Tuning LayerNorm
in Attention"). Works on BERT-family (LayerNorm) and Llama-family (RMSNorm) models alike. Block selection
with `freeze`/`layers` works as for bitfit. The model saves and reloads as a plain checkpoint.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from leantune.methods import _blocks
from leantune.methods.registry import MethodConfig, MethodContext, MethodSpec, register


class LayerNormConfig(MethodConfig):
    name: Literal["layernorm"] = "layernorm"
    layers: list[int] | None = Field(
        None, description="Blocks whose norms train; null: every block still training after freeze."
    )


def is_norm(module_name: str, param_name: str, module) -> bool:
    from torch import nn

    norm_class = isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(
        ("LayerNorm", "RMSNorm")
    )
    return norm_class and param_name in ("weight", "bias")


def apply(model, cfg: LayerNormConfig, ctx: MethodContext):
    names = _blocks.train_base_subset(
        model, "layernorm", ctx, cfg.layers, is_norm, "LayerNorm/RMSNorm weights", "bitfit or lora"
    )
    object.__setattr__(model, "leantune_layernorm", names)
    return model


def report(model, cfg: LayerNormConfig) -> dict[str, Any]:
    counts = _blocks.count_selected(model, getattr(model, "leantune_layernorm", []))
    return {**counts, "head": _blocks.own_counts(model, "head")["trainable"]}


SPEC = register(MethodSpec("layernorm", LayerNormConfig, apply, report=report))
