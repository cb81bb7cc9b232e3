"""The plug-in contract between a fine-tuning method and the rest of leantune.

A method is one module in `leantune/methods/` (private helpers start with `_` and are not methods). It
provides, and hands to `leantune.methods.registry.register` at import time as a `MethodSpec`:

- a pydantic config, a subclass of `MethodConfig` with `name: Literal["<method>"] = "<method>"` and its
  own fields and defaults (unknown keys are an error); `added_positions()` if it puts positions before
  every input;
- `apply(model, cfg, ctx: MethodContext) -> model`: freeze, wrap or inject, and leave `requires_grad`
  right on every parameter; it may return a new model object (peft does);
- optionally `runtime(model, cfg, ctx) -> MethodRuntime`: what the method does while training runs
  (its own optimisation step, hooks around each step, state that must survive `--resume`, numbers
  for the summary). Hooks get the trainer as a `TrainerView`: exactly what a runtime may use of it;
- optionally `report(model, cfg) -> dict`: static numbers for summary.json;
- optionally `load_options(cfg, task, dtype) -> dict | None`: keyword arguments for the base model's
  `from_pretrained` (a `quantization_config`, so a quantised base never holds its full-precision weights),
  asked before the base loads, for training and for every reload; None loads as usual. The loader merges
  them without asking which method gave them;
- optionally `reload(model, cfg, run_dir) -> model`: what `eval`/`export` must rebuild on a freshly
  loaded base before the saved weights load (a quantised base);
- optionally `plan_for(model, cfg) -> MemoryContribution`: what applying the method to `model` would
  change in the memory model, for the memory planner, which never imports a method.

What a method module must not do: import torch, transformers or peft at module level (validating a
config must stay fast; import them inside functions), import from `train`, `eval`, `bench`, `recipes`
or `cli` (methods sit below them; `tests/test_layers.py` checks it), or test another method's name
except to check the order of a combination (`ctx.methods`).

What the trainer guarantees: methods are applied in config order (a combination is a list, not a new
code path); one runtime per method that has one is created before anything is written, and its
`check_run(cfg, world)` may refuse settings it cannot honour then; once the optimizer exists every
runtime's hooks run in config order, never asking which method it is: `on_train_start` once (also
after a resume loaded their state), then per optimizer step `on_step_start`, the micro-batches
(through the last runtime that defines `step`, else `leantune.models.backprop.backprop_step`), the
optimizer step and `zero_grad`, `on_step_end`.
Checkpoints hold each runtime's `state()`/`tensors()`; `--resume` hands them back to `load`. The final
model is saved with `model.save_pretrained` (see `registry.extend_save` for extra files), so a peft
model saves its adapter and anything else the whole model. `tests/test_method_contract.py` runs every
registered method through apply -> train -> save -> reload -> eval; a new method gets it for free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, field_validator

if TYPE_CHECKING:
    from leantune.memory.contribution import MemoryContribution
    from leantune.settings import DataConfig, ModelConfig, TrainConfig


class MethodConfig(BaseModel):
    """Base of every method's config; `name` selects the method. Numbers are strict: no inf/NaN, and no
    silent coercion (`r: true` is not 1, `r: 2.0` is not 2; see `leantune.numbers`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
    name: str

    @field_validator("*", mode="before")
    @classmethod
    def _no_number_coercion(cls, value: Any, info) -> Any:
        from leantune.numbers import check_number

        return check_number(value, cls.model_fields[info.field_name].annotation)

    def added_positions(self) -> int:
        """Sequence positions this method puts before every input (a soft prompt, a prefix): the run
        checks `model.max_length` plus these against the model's positions before the model loads, so a
        long batch cannot overrun the position table mid-run. Most methods add none."""
        return 0


@dataclass(frozen=True)
class MethodContext:
    """What a method may need to know about the run when it is applied."""

    task: str
    seed: int
    methods: tuple[str, ...] = ()  # every configured method's name, in order (for order checks)


class TrainStateView(Protocol):
    """The trainer's counters a runtime may read (`step`) or reset (the best-checkpoint tracking, when
    it re-shapes parameters and the best checkpoint no longer fits the model)."""

    step: int  # 0-based index of the optimizer step being computed (in on_step_end: the one just done)
    best_metric: float | None
    best_step: int | None
    bad_evals: int


class RunLogView(Protocol):
    def log(self, record: dict[str, Any]) -> None:
        """Append one record (with a "step" key) to the run's metrics.jsonl."""


class RunConfigView(Protocol):
    """What runtimes read of the run config (`leantune.config.Config`, a layer above the methods)."""

    task: str
    model: ModelConfig
    data: DataConfig
    train: TrainConfig


class StepPeakView(Protocol):
    """The peak memory of the step just done (`leantune.memory.measure.StepPeakMeter`, which the trainer
    starts and stops around every optimisation step, before `on_step_end`)."""

    source: str | None  # "cuda_max_allocated", "rss", or None (no step peak known)
    last: int | None  # bytes: the step's peak (CUDA max allocated, or peak RSS)
    last_growth: int | None  # bytes: that peak minus what was held when the step started


@runtime_checkable
class TrainerView(Protocol):
    """Everything a `MethodRuntime` may use of the trainer (`leantune.train.loop.Trainer` implements it;
    `tests/test_method_contract.py` checks that the methods use nothing else)."""

    cfg: RunConfigView  # the validated run config (read only)
    state: TrainStateView
    run_dir: Path  # the run folder (for a method's own files, e.g. a plot)
    world: int  # number of processes (methods that cannot run distributed refuse > 1)
    total_steps: int  # optimizer steps this run will do
    train_data: Any  # tokenised training examples (a sequence of dicts; read only)
    lengths: list[int]  # tokens per training example
    pad_id: int
    num_labels: int  # classes of a classification task (0 otherwise)
    log: RunLogView
    step_meter: StepPeakView  # the step's peak memory, for methods that keep a budget

    @property
    def module(self) -> Any:
        """The model being trained, unwrapped from accelerate/DDP."""

    @property
    def torch_optimizer(self) -> Any:
        """torch's optimizer the loop steps (unwrapped from accelerate): its `.state` holds the
        per-parameter moments a runtime may move, drop or re-map when it changes parameters."""

    def sync_parameters(self) -> None:
        """Re-read the trainable parameters after the runtime replaced some (e.g. resized factors)."""


class MethodRuntime:
    """What a method does while training runs; every hook is optional (the base does nothing).

    The trainer creates one runtime per configured method after the model is prepared and the optimizer
    built, and calls the hooks of all of them in config order; it never asks which method it is.

    `step`: when a subclass defines it, it replaces backprop for each micro-batch, with the signature of
    `leantune.models.backprop.backprop_step(model, batch, accelerator, scale) -> detached loss`: it must
    leave `scale * gradient` (or its estimate) accumulated in `.grad` of the trainable parameters, which
    the trainer's optimizer then applies. The last method in the list that defines a step wins.
    `state`/`tensors` are saved in every checkpoint and handed back to `load` on `--resume`, so a method
    with its own randomness or learned parts (a sampled layer set, an approximator network) resumes
    exactly. Derive per-step randomness from (seed, step) where possible: then there is nothing to save.
    """

    step: Callable[..., Any] | None = None
    # True for a method that replaces trainable parameters while training runs (e.g. resizes them): on
    # --resume its `load` then runs *before* the checkpoint's weights are loaded, so it can re-shape the
    # model to the checkpoint's shapes, and the trainer re-reads the parameters (`sync_parameters`).
    reshapes_parameters: bool = False
    # Why `train.lr: auto` cannot run with this method (it owns the update, or its per-step hooks keep
    # state the range test would have to replay), or None: the test (train/lr_find.py) runs the trainer's
    # step without per-step hooks and restores `state`/`tensors` afterwards.
    lr_auto_refusal: str | None = None

    def check_run(self, cfg: RunConfigView, world: int) -> None:
        """Refuse (UserError) run settings this method cannot honour; called with the number of
        processes before anything is written, so a refusal never costs an earlier run's files."""

    def on_train_start(self, trainer: TrainerView) -> None:
        """After the optimizer exists, before the first step (also after a resume has loaded state)."""

    def on_step_start(self, trainer: TrainerView) -> None:
        """Before the micro-batches of optimizer step `trainer.state.step` (0-based) are computed."""

    def on_step_end(self, trainer: TrainerView) -> None:
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
    """One registered method: its name, config class and hooks (see the module docstring)."""

    name: str
    config_cls: type[MethodConfig]
    apply: Callable[[Any, Any, MethodContext], Any]
    runtime: Callable[[Any, Any, MethodContext], MethodRuntime] | None = None
    report: Callable[[Any, Any], dict[str, Any]] | None = None
    # Asked before the base model loads: `load_options(cfg, task, dtype) -> dict | None`, keyword arguments
    # for `from_pretrained` (e.g. a BitsAndBytesConfig as `quantization_config`); None: load as usual.
    load_options: Callable[[Any, str, str], dict[str, Any] | None] | None = None
    # Rebuilds, on a freshly loaded base model, what the saved weights do not hold (a quantised base):
    # `reload(model, cfg, run_dir) -> model`, called by `eval`/`export` before the adapter is loaded.
    reload: Callable | None = None
    # Restores, on the reloaded model (adapter loaded), what loading does not: `after_load(model, cfg) ->
    # model`, called by `eval`/`export` after `PeftModel.from_pretrained` (adalora's eval-time loss).
    after_load: Callable | None = None
    # The memory hook: `plan_for(model, cfg) -> MemoryContribution`, what applying this method to `model`
    # as it is now would add to (negative: take from) the memory model's weights, gradients, optimizer
    # state and activations. Only for effects the planner cannot read off an already adapted model.
    plan_for: Callable[[Any, Any], MemoryContribution] | None = None
