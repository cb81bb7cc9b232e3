"""Fine-tuning methods as plug-ins; see `registry.py` for the contract."""

import dataclasses

from leantune.methods.registry import MethodConfig, MethodContext, MethodSpec, get_method, register

__all__ = ["MethodConfig", "MethodContext", "MethodSpec", "get_method", "register", "apply_methods"]


def apply_methods(model, configs, ctx: MethodContext):
    """Apply each configured method in order (combinations are a list, not a new code path)."""
    ctx = dataclasses.replace(ctx, methods=tuple(cfg.name for cfg in configs))
    for cfg in configs:
        model = get_method(cfg.name).apply(model, cfg, ctx)
    return model
