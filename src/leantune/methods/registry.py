"""Registration and discovery of methods: the trainer, the recipes and the config only ever see
`MethodSpec`s, looked up by name.

The contract itself (what a method module provides, what the trainer guarantees, the `TrainerView` a
runtime gets) is `leantune.methods.base`; read its docstring first. This module re-exports it, so a
method module needs one import line:

    from leantune.methods.registry import MethodConfig, MethodContext, MethodRuntime, MethodSpec, register

A method module calls `register(MethodSpec(...))` at import time. Every public module of this package
is discovered (`available_methods`), so adding a method touches one file; modules starting with `_` are
helpers, not methods.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from leantune.errors import UserError
from leantune.methods.base import (
    MethodConfig,
    MethodContext,
    MethodRuntime,
    MethodSpec,
    RunLogView,
    TrainerView,
    TrainStateView,
)

__all__ = [
    "MethodConfig",
    "MethodContext",
    "MethodRuntime",
    "MethodSpec",
    "RunLogView",
    "TrainStateView",
    "TrainerView",
    "available_methods",
    "extend_save",
    "get_method",
    "method_config_class",
    "register",
]

# Modules of this package that are not methods.
NOT_METHODS = frozenset({"registry", "base"})


def extend_save(
    model, write_extra: Callable[[Any, Path], None], state_dict: Callable[[Any], dict] | None = None
) -> None:
    """Make `model.save_pretrained` also write what a method keeps outside the weights plain
    `from_pretrained` reloads (a mask seed, a prompt), optionally saving another `state_dict`.

    The run, `eval` and `export` save through `model.save_pretrained` and never ask which method made the
    model; wrapping the model's current (possibly already extended) save lets several methods compose."""
    import types

    previous = model.save_pretrained

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        if state_dict is not None:
            kwargs.setdefault("state_dict", state_dict(self))
        previous(save_directory, **kwargs)
        write_extra(self, Path(save_directory))

    model.save_pretrained = types.MethodType(save_pretrained, model)


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise RuntimeError(f"method '{spec.name}' registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def _load_builtins() -> None:
    import leantune.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in NOT_METHODS and not info.name.startswith("_"):
            importlib.import_module(f"leantune.methods.{info.name}")


def get_method(name: str) -> MethodSpec:
    _load_builtins()
    if name not in _REGISTRY:
        known = sorted(_REGISTRY)
        hint = difflib.get_close_matches(name, known, n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"known methods: {', '.join(known)}"
        raise UserError(f"unknown method '{name}': {fix}")
    return _REGISTRY[name]


def load_options(method_cfgs, task: str, dtype: str) -> dict[str, Any]:
    """Every configured method's `from_pretrained` arguments for the base model, merged; two methods
    setting the same argument is refused (neither could know what the other's does)."""
    merged: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for mcfg in method_cfgs:
        hook = get_method(mcfg.name).load_options
        for key, value in ((hook(mcfg, task, dtype) if hook else None) or {}).items():
            if key in merged:
                raise UserError(
                    f"methods {owner[key]} and {mcfg.name} both set how the base model loads ({key}); "
                    "keep one of them"
                )
            merged[key], owner[key] = value, mcfg.name
    return merged


def method_config_class(name: str) -> type[MethodConfig]:
    return get_method(name).config_cls


def check_method_list(task: str, names: list[str]) -> None:
    """Refuse, by names alone (no torch), method lists whose composition makes no sense."""
    from leantune.methods._blocks import check_method_list as check

    check(task, names)


def describe_method(name: str, width: int = 100) -> str:
    """The first sentence of the method module's docstring: what `leantune methods` shows beside it."""
    import re
    import sys

    doc = sys.modules[get_method(name).apply.__module__].__doc__ or ""
    paragraph = " ".join(doc.strip().split("\n\n", 1)[0].split())
    sentence = re.split(r"(?<!\bal)\.\s+(?=[A-Z(])", paragraph, maxsplit=1)[0].rstrip(".")
    return sentence if len(sentence) <= width else sentence[: width - 3].rsplit(" ", 1)[0] + "..."


def available_methods() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def shipped_methods() -> list[str]:
    """The methods of this package, without any a program (a test) registered beside them."""
    return [n for n in available_methods() if _REGISTRY[n].apply.__module__.startswith(f"{__package__}.")]
