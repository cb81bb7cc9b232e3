"""Fine-tuning methods as plug-ins; see `base.py` for the contract and `registry.py` for registration."""

import dataclasses

from leantune.methods.registry import (
    MethodConfig,
    MethodContext,
    MethodRuntime,
    MethodSpec,
    TrainerView,
    get_method,
    register,
)

__all__ = [
    "MethodConfig",
    "MethodContext",
    "MethodRuntime",
    "MethodSpec",
    "TrainerView",
    "apply_methods",
    "get_method",
    "register",
]


def apply_methods(model, configs, ctx: MethodContext):
    """Apply each configured method in order (combinations are a list, not a new code path)."""
    ctx = dataclasses.replace(ctx, methods=tuple(cfg.name for cfg in configs))
    for cfg in configs:
        model = get_method(cfg.name).apply(model, cfg, ctx)
    return model
