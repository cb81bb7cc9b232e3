"""Methods are plug-ins registered by name; the trainer only ever sees `MethodSpec`s.

A method module defines a pydantic config (subclass of `MethodConfig`), an `apply(model, cfg, ctx)` that
freezes/wraps/injects and leaves `requires_grad` right, optionally a `runtime(model, cfg, ctx)` factory
returning a `MethodRuntime` (per-run behaviour during training: a custom optimisation step, hooks around
each optimizer step, state that must survive `--resume`, numbers for the summary) and a static `report`.
It calls `register(...)` at import time; every module in this package is discovered, so adding a method
touches one file. Method modules must import torch/peft lazily (inside functions) so that validating a
config stays fast.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from leantune.errors import UserError

# Modules of this package that are not methods.
NOT_METHODS = frozenset({"registry"})


class MethodConfig(BaseModel):
    """Base of every method's config; `name` selects the method."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
    name: str

    @field_validator("*", mode="before")
    @classmethod
    def _no_number_coercion(cls, value: Any, info) -> Any:
        from leantune.numbers import check_number

        return check_number(value, cls.model_fields[info.field_name].annotation)


@dataclass(frozen=True)
class MethodContext:
    """What a method may need to know about the run when it is applied."""

    task: str
    seed: int
    methods: tuple[str, ...] = ()  # every configured method's name, in order (for order checks)


class MethodRuntime:
    """What a method does while training runs; every hook is optional (the base does nothing).

    The trainer creates one runtime per configured method after the model is prepared and the optimizer
    built, and calls the hooks of all of them in config order; it never asks which method it is.

    `step`: when a subclass defines it, it replaces backprop for each micro-batch, with the signature of
    `leantune.train.step.backprop_step(model, batch, accelerator, scale) -> detached loss`: it must leave
    `scale * gradient` (or its estimate) accumulated in `.grad` of the trainable parameters, which the
    trainer's optimizer then applies. The last method in the list that defines a step wins.
    `state`/`tensors` are saved in every checkpoint and handed back to `load` on `--resume`, so a method
    with its own randomness or learned parts (a sampled layer set, an approximator network) resumes
    exactly. Derive per-step randomness from (seed, step) where possible: then there is nothing to save.
    """

    step: Callable[..., Any] | None = None
    # True for a method that replaces trainable parameters while training runs (e.g. resizes them): on
    # --resume its `load` then runs *before* the checkpoint's weights are loaded, so it can re-shape the
    # model to the checkpoint's shapes, and the trainer re-reads the parameters (`sync_parameters`).
    reshapes_parameters: bool = False

    def on_train_start(self, trainer: Any) -> None:
        """After the optimizer exists, before the first step (also after a resume has loaded state)."""

    def on_step_start(self, trainer: Any) -> None:
        """Before the micro-batches of optimizer step `trainer.state.step` (0-based) are computed."""

    def on_step_end(self, trainer: Any) -> None:
        """After the optimizer step and `zero_grad`; `trainer.state.step` still names the step just done."""

    def state(self) -> dict[str, Any]:
        """JSON-serialisable state for checkpoints."""
        return {}

    def tensors(self) -> dict[str, Any]:
        """Tensors for checkpoints (saved with safetensors)."""
        return {}

    def load(self, state: dict[str, Any], tensors: dict[str, Any]) -> None:
        """Restore what `state`/`tensors` returned when the checkpoint was written."""

    def report(self) -> dict[str, Any]:
        """Numbers this method owns, for summary.json (`method_reports`)."""
        return {}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type[MethodConfig]
    apply: Callable[[Any, Any, MethodContext], Any]
    runtime: Callable[[Any, Any, MethodContext], MethodRuntime] | None = None
    report: Callable[[Any, Any], dict[str, Any]] | None = None
    # Rebuilds, on a freshly loaded base model, what the saved weights do not hold (a quantised base):
    # `reload(model, cfg, run_dir) -> model`, called by `eval`/`export` before the adapter is loaded.
    reload: Callable | None = None


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


def method_config_class(name: str) -> type[MethodConfig]:
    return get_method(name).config_cls


def available_methods() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)
