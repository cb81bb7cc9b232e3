"""The optimizer and learning-rate schedule named in `train`, each the library's own implementation:
torch's AdamW (for_loop / foreach / fused kernels) and SGD, bitsandbytes' 8-bit and paged AdamW,
transformers' Adafactor, and transformers.get_scheduler's schedules, all with the usual no-decay groups
(biases and norms). Nothing here re-implements an update rule.
"""

from __future__ import annotations

import torch

from leantune.errors import UserError

#: optimizers that need bitsandbytes, and its class for each
BNB_OPTIMIZERS = {
    "adamw_8bit": "AdamW8bit",
    "paged_adamw": "PagedAdamW",
    "paged_adamw_8bit": "PagedAdamW8bit",
}
#: optimizers whose state FSDP2 sharded checkpoints can hold (per-parameter tensors shaped like it)
FSDP_OPTIMIZERS = ("adamw", "sgd")

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
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    impl: str = "auto",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """torch's AdamW. `impl` picks its kernel: "for_loop" (one parameter at a time), "foreach" (batched per
    group), "fused" (one kernel; CPU since torch 2.4) or "auto": fused where every trainable parameter can
    take it (`fused_capable`), else torch's own choice.

    Why auto is not simply torch's choice: torch defaults to foreach only for CUDA tensors, so on CPU it
    runs the for_loop kernel, ~10 small ops per parameter per step. On full fine-tuning of MiniLM that
    was 13% of the step (benchmarks/results/profile/step-full.json); the fused kernel does the same
    arithmetic (tests/test_loop.py: the same weights within 1e-6) in one pass over each tensor."""
    groups = param_groups(model, weight_decay)
    if impl == "auto":
        impl = "fused" if fused_capable([p for g in groups for p in g["params"]]) else "torch"
    kernel = {
        "torch": {},
        "for_loop": {"foreach": False},
        "foreach": {"foreach": True},
        "fused": {"fused": True},
    }
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kernel[impl])


def fused_capable(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes these parameters: plain (not sharded DTensor) floating-point
    tensors, all on one device type that has the fused kernel."""
    try:  # a private torch helper (2.4+): without it, leave the choice to torch
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:
        return False
    devices = {p.device.type for p in params}
    return (
        len(devices) == 1
        and devices <= set(_get_fused_kernels_supported_devices())
        and all(torch.is_floating_point(p) and type(p.data) is torch.Tensor for p in params)
    )


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decayed and not-decayed groups, in that order, leaving out an empty one."""
    decay, no_decay = decay_split(model)
    if not decay and not no_decay:
        raise ValueError("no trainable parameters")
    both = ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
    return [g for g in both if g["params"]]


def check_optimizer(tc, cuda: bool, fsdp: bool) -> None:
    """Refuse, before anything is written, an optimizer this machine or launch cannot run as named:
    bitsandbytes missing, a paged optimizer without CUDA (bitsandbytes then silently runs it unpaged),
    or a non-torch optimizer under FSDP (its state is not shaped like the sharded parameters)."""
    name = tc.optimizer
    if name in BNB_OPTIMIZERS:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError(
                f"train.optimizer={name} needs bitsandbytes, which is not installed: "
                "pip install 'leantune[quant]' (or pip install bitsandbytes)"
            )
        if name.startswith("paged") and not cuda:
            raise UserError(
                f"train.optimizer={name} pages optimizer state between GPU and host memory, and this "
                "machine has no CUDA GPU (bitsandbytes would run it unpaged); use adamw_8bit or adamw"
            )
    if fsdp and name not in FSDP_OPTIMIZERS:
        raise UserError(
            f"train.optimizer={name} cannot be sharded by train.distributed=fsdp here; use "
            f"{' or '.join(FSDP_OPTIMIZERS)}, or train.distributed=ddp"
        )


def make_optimizer(model: torch.nn.Module, tc) -> torch.optim.Optimizer:
    """The optimizer `tc.optimizer` names, over the trainable parameters of `model`."""
    groups = param_groups(model, tc.weight_decay)
    betas = (tc.adam_beta1, tc.adam_beta2)
    lr = start_lr(tc)
    if tc.optimizer == "adamw":
        return build_optimizer(model, lr, tc.weight_decay, tc.adamw_impl, betas, tc.adam_epsilon)
    if tc.optimizer in BNB_OPTIMIZERS:
        import bitsandbytes as bnb

        cls = getattr(bnb.optim, BNB_OPTIMIZERS[tc.optimizer])
        return cls(groups, lr=lr, betas=betas, eps=tc.adam_epsilon)
    if tc.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # the schedule drives the rate (as transformers.Trainer's `optim=adafactor`): no relative step
        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    if tc.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=tc.momentum, nesterov=tc.nesterov)
    raise ValueError(f"unknown optimizer {tc.optimizer!r}")  # the config's Literal keeps this unreachable


def start_lr(tc) -> float:
    """The rate the optimizer is built with: train.lr, or under `lr: auto` the range test's first rate
    (train/lr_find.py then sets the chosen one before the first real step)."""
    return tc.lr_auto_min if tc.lr == "auto" else tc.lr


def warmup_steps(tc, total: int) -> int:
    """Warmup steps of a run of `total` optimizer steps: train.warmup_steps, else the ratio's share."""
    if tc.warmup_steps is None:
        return round(tc.warmup_ratio * total)
    if tc.warmup_steps > total:
        raise UserError(
            f"train.warmup_steps={tc.warmup_steps} exceeds the {total} optimizer steps of this run: the "
            "learning rate would never reach train.lr; lower warmup_steps (or use warmup_ratio)"
        )
    return tc.warmup_steps


def make_scheduler(optimizer: torch.optim.Optimizer, tc, total: int):
    """transformers.get_scheduler's schedule `tc.lr_scheduler` (the names transformers.Trainer takes)."""
    from transformers import get_scheduler

    extra = {"num_cycles": tc.lr_cycles} if tc.lr_scheduler == "cosine_with_restarts" else {}
    return get_scheduler(
        tc.lr_scheduler,
        optimizer,
        num_warmup_steps=warmup_steps(tc, total),
        num_training_steps=total,
        scheduler_specific_kwargs=extra,
    )


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
