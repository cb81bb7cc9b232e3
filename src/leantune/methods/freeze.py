"""Layer-wise freezing: embeddings and the lowest k blocks (or any named modules) stop training.

The lower layers of a pretrained transformer hold general features; freezing them cuts gradient memory
and backward time roughly in proportion to k while the upper blocks still adapt.

In a combination `freeze` decides which blocks train at all: it records the indices of the blocks it froze
whole on the model, and `lora`/`adapters` listed after it attach only to the other blocks (unless their
own `layers` names blocks). It must therefore come before them; its report gives the trainable parameters
of the finished model per block and per method.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from leantune.errors import UserError
from leantune.methods import _blocks
from leantune.methods.registry import MethodConfig, MethodContext, MethodSpec, register


class FreezeConfig(MethodConfig):
    name: Literal["freeze"] = "freeze"
    layers: int | None = Field(None, ge=0, description="Freeze the lowest k blocks.")
    embeddings: bool = Field(True, description="Also freeze the embeddings.")
    modules: list[str] = Field(
        default_factory=list,
        description="Regexes of module names to freeze, e.g. ['pooler', 'layer\\.0\\.'].",
    )

    @field_validator("modules")
    @classmethod
    def _valid_patterns(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"'{pattern}' is not a valid regular expression ({exc})") from None
        return patterns

    @model_validator(mode="after")
    def _something_to_freeze(self) -> FreezeConfig:
        if self.layers is None and not self.modules and not self.embeddings:
            raise ValueError("freeze needs `layers`, `modules` or `embeddings: true`")
        return self


def frozen_module_names(model, cfg: FreezeConfig) -> list[str]:
    from leantune.models.structure import embedding_modules, find_blocks

    names: list[str] = []
    if cfg.embeddings:
        names += [n for n, _ in embedding_modules(model)]
    if cfg.layers:
        prefix, blocks = find_blocks(model)
        if cfg.layers > len(blocks):
            raise UserError(
                f"freeze: layers={cfg.layers} but the model has {len(blocks)} blocks; "
                f"set methods.N.layers between 0 and {len(blocks)}"
            )
        names += [f"{prefix}.{i}" for i in range(cfg.layers)]
    all_names = [n for n, _ in model.named_modules()]
    for pattern in cfg.modules:
        hits = [n for n in all_names if n and re.search(pattern, n)]
        if not hits:
            raise UserError(
                f"freeze: module pattern '{pattern}' matches no module; "
                f"top-level modules are: {', '.join(n for n, _ in model.named_children())}"
            )
        names += hits
    return names


def check_order(model, ctx: MethodContext) -> None:
    _blocks.check_method_list(ctx.task, ctx.methods)
    if hasattr(model, "peft_config"):
        raise UserError(
            "freeze must come before the peft method that wraps this model (freeze decides which blocks "
            "it attaches to): write methods: [freeze, ...]"
        )


def frozen_block_indices(model) -> set[int]:
    """Blocks none of whose parameters trains (what freeze froze, by layers or by module patterns)."""
    try:
        _, blocks = _blocks.blocks_of(model, "freeze")
    except UserError:
        return set()
    return {i for i, b in enumerate(blocks) if not any(p.requires_grad for p in b.parameters())}


def apply(model, cfg: FreezeConfig, ctx: MethodContext):
    check_order(model, ctx)
    modules = dict(model.named_modules())
    for name in frozen_module_names(model, cfg):
        for p in modules[name].parameters():
            p.requires_grad_(False)
    _blocks.record_frozen(model, frozen_block_indices(model))
    return model


def report(model, cfg: FreezeConfig) -> dict[str, Any]:
    """The frozen blocks and the finished model's trainable parameters per block and per method (the
    numbers of every method in the list together; each adds up to the run's trainable count)."""
    return {"frozen_blocks": sorted(_blocks.frozen_blocks(model)), **_blocks.breakdown(model)}


SPEC = register(MethodSpec("freeze", FreezeConfig, apply, report=report))
