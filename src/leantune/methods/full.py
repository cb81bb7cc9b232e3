"""Full fine-tuning: every parameter trains. The reference every other method is measured against."""

from __future__ import annotations

from typing import Literal

from leantune.methods.registry import MethodConfig, MethodContext, MethodSpec, register


class FullConfig(MethodConfig):
    name: Literal["full"] = "full"


def apply(model, cfg: FullConfig, ctx: MethodContext):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


SPEC = register(MethodSpec("full", FullConfig, apply))
