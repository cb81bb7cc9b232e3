"""AdamW with the usual no-decay groups (biases and norms), and linear warmup then linear decay."""

from __future__ import annotations

import torch

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight", "ln_")


def unwrap_optimizer(optimizer):
    """torch's optimizer behind accelerate's `AcceleratedOptimizer` (or the optimizer itself): the one
    whose `.state` and `.param_groups` hold the real per-parameter moments. Methods reach it as
    `trainer.torch_optimizer`."""
    return getattr(optimizer, "optimizer", optimizer)


def decay_split(model: torch.nn.Module) -> tuple[list, list]:
    """The trainable parameters, in `named_parameters` order: (decayed, not decayed: biases and norms)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(k in name for k in NO_DECAY) or p.ndim < 2 else decay).append(p)
    return decay, no_decay


def build_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, impl: str = "auto"
) -> torch.optim.Optimizer:
    """`impl` picks torch's AdamW kernel: "auto" (torch's choice: foreach on multi-tensor devices),
    "for_loop" (one parameter at a time), "foreach" (batched per group) or "fused" (one kernel; CPU since
    torch 2.4). The arithmetic is the same; benchmarks/suites/speed-levers-2.yaml measures the speed."""
    decay, no_decay = decay_split(model)
    if not decay and not no_decay:
        raise ValueError("no trainable parameters")
    groups = [
        g
        for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
        if g["params"]
    ]
    kernel = {
        "auto": {},
        "for_loop": {"foreach": False},
        "foreach": {"foreach": True},
        "fused": {"fused": True},
    }
    return torch.optim.AdamW(groups, lr=lr, **kernel[impl])


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    """The same schedule as transformers.Trainer's default, so baselines compare like with like."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, warmup, total)


def compile_blocks(model: torch.nn.Module) -> None:
    """Compile each transformer block in place (`nn.Module.compile`), not the whole model: the module
    objects, their forward hooks (recompute, prefix cache, grad_approx) and the optimizer's parameters stay
    the same, and graph breaks in PEFT/HF glue outside the blocks cost nothing. Dynamic shapes, because
    padding is per batch."""
    from leantune.models.structure import find_blocks

    _, blocks = find_blocks(model)
    for block in blocks:
        block.compile(dynamic=True)
