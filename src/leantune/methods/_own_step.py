"""Shared by the methods that replace the trainer's optimisation step (mezo, lomo, adalomo): the checks
that refuse settings they cannot honour, and what they read from the trainer."""

from __future__ import annotations

from typing import Any

from leantune.errors import UserError

# Methods that bring their own optimisation step: at most one of them per run.
OWN_STEP = ("mezo", "lomo", "adalomo", "grad_approx")
# The trainer's optimizer options (train.optimizer and its keys), at their neutral values: a method that
# applies its update itself ignores them, so it refuses them when set (see `check_train_options`).
OPTIMIZER_OPTIONS: dict[str, Any] = {
    "optimizer": "adamw",
    "adamw_impl": "auto",
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
}


def refuse_other_steps(method: str, methods: tuple[str, ...]) -> None:
    others = [m for m in methods if m in OWN_STEP and m != method]
    if others:
        raise UserError(
            f"{method} replaces the optimisation step and cannot be combined with {others[0]}, which has "
            "its own; keep one of them in methods"
        )


def check_train_options(cfg, world: int, method: str, ignored: dict[str, Any]) -> None:
    """Refuse what the method cannot do, and options it would ignore when the user set them (a default
    that does not apply passes: `ignored` maps each such option to its neutral value)."""
    tc = cfg.train
    if tc.nan_policy == "skip":
        raise UserError(
            f"{method} applies its update itself, so train.nan_policy=skip cannot drop a step's update; "
            "use train.nan_policy=stop"
        )
    if world > 1:
        raise UserError(f"{method} runs in a single process only; launch it without multiple processes")
    if tc.mixed_precision == "fp16":
        raise UserError(
            f"{method}: train.mixed_precision=fp16 is not supported (its loss scaling bypasses the "
            "update); use bf16 or no"
        )
    defaults = type(tc).model_fields
    for key, neutral in ignored.items():
        value = getattr(tc, key)
        # the field's default passes too: a run's saved config.yaml sets every key, and must resume
        if key in tc.model_fields_set and value not in (neutral, defaults[key].default):
            raise UserError(f"{method} does not use train.{key} (set to {value}); remove it")


def trainable_tensors(model) -> list:
    """Trainable parameters, each once (tied weights are one tensor)."""
    seen: set[int] = set()
    out = []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def adamw_bytes(params: list) -> tuple[int, int]:
    """(gradient bytes, AdamW state bytes) the memory model's backprop reference counts for `params`
    (two moments the size of each tensor and a 4-byte step; leantune.memory.estimate)."""
    grads = sum(p.numel() * p.element_size() for p in params)
    return grads, 2 * grads + 4 * len(params)
