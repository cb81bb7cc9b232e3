"""Methods are plug-ins registered by name; the trainer only ever sees `MethodSpec`s.

A method module defines a pydantic config (subclass of `MethodConfig`), an `apply(model, cfg, ctx)` that
freezes/wraps/injects and leaves `requires_grad` right, and optionally a custom optimisation `step` and a
`report` of the numbers it owns. It calls `register(...)` at import time. Method modules must import
torch/peft lazily (inside functions) so that validating a config stays fast.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from leantune.errors import UserError

BUILTIN_METHODS = ("full", "freeze", "lora")


class MethodConfig(BaseModel):
    """Base of every method's config; `name` selects the method."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    name: str


@dataclass(frozen=True)
class MethodContext:
    """What a method may need to know about the run when it is applied."""

    task: str
    seed: int


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type[MethodConfig]
    apply: Callable[[Any, Any, MethodContext], Any]
    step: Callable[..., Any] | None = None
    report: Callable[[Any, Any], dict[str, Any]] | None = None


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise RuntimeError(f"method '{spec.name}' registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def _load_builtins() -> None:
    for name in BUILTIN_METHODS:
        importlib.import_module(f"leantune.methods.{name}")


def get_method(name: str) -> MethodSpec:
    _load_builtins()
    if name not in _REGISTRY:
        known = sorted(_REGISTRY)
        hint = difflib.get_close_matches(name, known, n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"known methods: {', '.join(known)}"
        raise UserError(f"unknown method '{name}': {fix}")
    return _REGISTRY[name]


def method_config_class(name: str) -> type[MethodConfig]:
    return get_method(name).config_cls


def available_methods() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)
