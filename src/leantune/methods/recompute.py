"""Activation recomputation (gradient checkpointing) on a chosen subset of blocks.

A recomputed block keeps only its inputs during the forward and runs again in the backward to rebuild
its activations: less peak memory for one more forward of that block. transformers'
`gradient_checkpointing_enable` is all-or-nothing (every layer of the model); choosing blocks (by
index, or every k-th) trades memory for time in steps, so a run can recompute just enough to fit.

Each chosen block's own `forward` is wrapped with `torch.utils.checkpoint` (non-reentrant, so keyword
arguments, frozen inputs and nested outputs pass through unchanged, and the RNG state is replayed so
dropout draws the same masks). Blocks are not replaced, so parameter names and saved adapters stay the
same. Caching keys/values would store them twice when a block reruns, so `use_cache` is turned off.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

from pydantic import Field, model_validator

from leantune.errors import UserError
from leantune.methods.registry import MethodConfig, MethodContext, MethodSpec, register


class RecomputeConfig(MethodConfig):
    name: Literal["recompute"] = "recompute"
    blocks: list[int] | None = Field(None, description="Block indexes to recompute (0-based; -1 = last).")
    every: int | None = Field(None, gt=0, description="Recompute every k-th block: 0, k, 2k, ...")
    all: bool = Field(False, description="Recompute every block.")

    @model_validator(mode="after")
    def _one_choice(self) -> RecomputeConfig:
        chosen = sum([self.blocks is not None, self.every is not None, self.all])
        if chosen != 1:
            raise ValueError("set exactly one of `blocks: [i, ...]`, `every: k` or `all: true`")
        if self.blocks is not None and not self.blocks:
            raise ValueError("`blocks` is empty; list at least one block index")
        return self


def chosen_blocks(cfg: RecomputeConfig, n_blocks: int) -> list[int]:
    if cfg.all:
        return list(range(n_blocks))
    if cfg.every is not None:
        return list(range(0, n_blocks, cfg.every))
    bad = [i for i in cfg.blocks or [] if not -n_blocks <= i < n_blocks]
    if bad:
        raise UserError(
            f"recompute: block index {bad[0]} is out of range for a model with {n_blocks} blocks; "
            f"use indexes 0..{n_blocks - 1} (or -1 for the last)"
        )
    return sorted({i % n_blocks for i in cfg.blocks or []})


def _checkpointed(block, forward, *args: Any, **kwargs: Any):
    import torch
    from torch.utils.checkpoint import checkpoint

    if not (block.training and torch.is_grad_enabled()):
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply(model, cfg: RecomputeConfig, ctx: MethodContext):
    from leantune.models.structure import find_blocks

    _, blocks = find_blocks(model)
    indexes = chosen_blocks(cfg, len(blocks))
    for i in indexes:
        block = blocks[i]
        if not hasattr(block, "leantune_recomputed"):  # applied twice: wrap once
            block.forward = functools.partial(_checkpointed, block, block.forward)
        block.leantune_recomputed = True
    for config in (getattr(m, "config", None) for m in model.modules()):
        if config is not None and getattr(config, "use_cache", None):
            config.use_cache = False
    return model


def report(model, cfg: RecomputeConfig) -> dict[str, Any]:
    from leantune.models.structure import find_blocks

    prefix, blocks = find_blocks(model)
    recomputed = [i for i, b in enumerate(blocks) if getattr(b, "leantune_recomputed", False)]
    return {"stack": prefix, "blocks": recomputed, "recomputed": len(recomputed), "of": len(blocks)}


SPEC = register(MethodSpec("recompute", RecomputeConfig, apply, report=report))
