"""AdamW with the usual no-decay groups (biases and norms), and linear warmup then linear decay."""

from __future__ import annotations

import torch

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight", "ln_")


def decay_split(model: torch.nn.Module) -> tuple[list, list]:
    """The trainable parameters, in `named_parameters` order: (decayed, not decayed: biases and norms)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(k in name for k in NO_DECAY) or p.ndim < 2 else decay).append(p)
    return decay, no_decay


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay, no_decay = decay_split(model)
    if not decay and not no_decay:
        raise ValueError("no trainable parameters")
    groups = [
        g
        for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
        if g["params"]
    ]
    return torch.optim.AdamW(groups, lr=lr)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    """The same schedule as transformers.Trainer's default, so baselines compare like with like."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, warmup, total)
