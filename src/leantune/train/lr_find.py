"""`train.lr: auto`: a learning-rate range test before training (Smith 2017, "Cyclical Learning Rates for
Training Neural Networks", section 3.3; fastai's `lr_find`).

K optimizer steps (train.lr_auto_steps, at most one epoch's worth when the data is short, at least 5)
with the rate growing exponentially from train.lr_auto_min to train.lr_auto_max; the loss of each step
is smoothed (exponential moving average, beta 0.9, bias-corrected, as fastai); the sweep stops early once
the smoothed loss passes 4x the best so far (divergence) or a step's loss or gradient is not finite.

Which rate: fastai's `valley` rule (its default suggestion since fastai 2.5): the longest stretch over
which the smoothed loss keeps falling (a longest decreasing subsequence of the smoothed curve, without
its first tenth and, on curves long enough, its last 5 points, as fastai passes it), and the rate half
way along that stretch. Why not our earlier rule (the rate at the minimum smoothed loss / 3): measured
on the 12 range tests of the time-to-quality workloads (MiniLM-L6, RT and TREC-6, LoRA r8 and full, 3
seeds; `python benchmarks/lr_auto_rules.py collect|compare`, benchmarks/results/lr-auto-rules), it chose
1.0-15x the best of HF Trainer's 3-rate sweep (median 2.7x), and LoRA runs at those rates ended near
the majority class: a 50-step test finds the rate that lowers the loss fastest within a few steps,
several times what a whole run with warmup and decay wants. Valley chose 0.33-1.5x (median |log10|
0.18 against 0.43; fastai v1's minimum / 10: 0.27, up to 4.5x). Twelve curves, one model, a 3-point
reference: evidence, not proof. Where it fails: a curve that stays flat until the loss drops at one
high rate (the random tiny BERT of the tests: the smoothed loss is noise until 7.5e-3) gives a long
"valley" of noise and a rate far too low (1.8e-5 there, where >= 2e-3 learns); the test of a learning
run therefore narrows the range (tests/test_lr_find.py). The choice is clamped into the tested range.

The test runs the run's own step (`Trainer._optimizer_step`: the method's step function, accumulation,
clipping, accelerate/DDP, the prefix cache, the task's loss inside the model) on the run's own first
batches. Afterwards the trainable weights, the optimizer state, the torch/python/numpy RNG states, the
trainer's counters, the prefix cache's counters and each method runtime's state are put back exactly, the
optimizer's base rate becomes the chosen one and the schedule is rebuilt on it, so the run then starts as
if the test had not happened except for the rate. Runtimes whose per-step hooks keep state of their own
(or that own the update) refuse `lr: auto` through `MethodRuntime.lr_auto_refusal`, so the test calls no
per-step hooks.

After the test the trainer holds a copy of the config whose `train.lr` is the chosen float: every reader
of `trainer.cfg.train.lr` (method runtimes from `on_train_start` on) sees a number. The run's config
(config.yaml, summary.config) keeps `auto`; the choice, the range and the curve are summary.json's
`lr_auto`, kept in `TrainState` so every checkpoint holds it and `--resume` never reruns the test (the
checkpoint's optimizer and scheduler hold the chosen rate already).

Why not torch-lr-finder (0.2.2): its `LRFinder.range_test` runs its own loop over a
(model, optimizer, criterion, DataLoader) as `criterion(model(inputs), labels)` and restores by
torch.save of model and optimizer; our loss lives inside the model, the step is a method's, batches come
from the trainer's length-bucketed sampler with accumulation, and it restores neither RNG states nor
runtime state. Wrapping it would measure a different step than the run takes, so ours is this module.
"""

from __future__ import annotations

import copy
import math
import statistics
import sys
import time
from typing import Any

import torch

from leantune.errors import UserError
from leantune.train import checkpoint as ckpt

SMOOTH_BETA = 0.9  # fastai's
#: the smoothed loss must fall by at least this many per-batch spreads for the curve to say anything
MIN_FALL_OVER_NOISE = 2.0
DIVERGE_FACTOR = 4.0  # stop once the smoothed loss passes this multiple of the best
MIN_STEPS = 5


def check_lr_auto(cfg, runtimes: list) -> None:
    """Refuse `train.lr: auto` with a runtime that cannot take part in the range test (one line)."""
    if cfg.train.lr != "auto":
        return
    for rt in runtimes:
        reason = getattr(rt, "lr_auto_refusal", None)
        if reason:
            raise UserError(f"train.lr=auto cannot run here: {reason}; set a number for train.lr")


def sweep_rates(lo: float, hi: float, k: int) -> list[float]:
    """k rates growing exponentially from lo to hi (both included)."""
    return [lo * (hi / lo) ** (i / (k - 1)) for i in range(k)]


def choose(rates: list[float], smoothed: list[float], lo: float, hi: float) -> float:
    """fastai's `valley` on the smoothed curve, inside [lo, hi] (see the module docstring). The first
    tenth of the points is left out (the average there rests on a batch or two) and, where at least 5
    points remain, the last 5 (the run-up to divergence), as fastai's lr_find does."""
    start, end = window(len(smoothed))
    first, last = longest_descent(smoothed[start:end])
    third = (last - first) / 3
    return min(max(rates[start + first + int(third) + int(third / 2)], lo), hi)


def window(n: int) -> tuple[int, int]:
    """The part of an n-point curve the rule reads: without its first tenth and, where at least 5
    points remain, its last 5."""
    start = n // 10
    return start, n - 5 if n - 5 - start >= 5 else n


def longest_descent(values: list[float]) -> tuple[int, int]:
    """The span of the longest strictly decreasing subsequence of `values` as fastai's `valley` gives
    it: (last index - its length, last index), O(n^2) over tens of points."""
    run = [1] * len(values)
    first = last = 0
    for i in range(1, len(values)):
        for j in range(i):
            if values[i] < values[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
            if run[last] < run[i]:
                last, first = i, max(i - run[i], 0)  # fastai's span start (clamped: -1 at a fall from 0)
    return first, last


def fall_over_noise(losses: list[float], smoothed: list[float]) -> float:
    """How far the smoothed loss fell (from the start of the window `choose` reads to its lowest point
    there) in units of the per-batch spread of the raw loss over the first third of the test, where the
    rates are too small to move the weights: the spread is what the batches alone make.

    Why: a curve that does not fall beyond that spread is noise, and every rule reads noise as a rate.
    On Rotten Tomatoes (binary, LoRA r8, 50 steps) the range test's loss barely moves: in
    time-to-quality-levers it chose 7e-5 on one seed (HF's best: 3e-3; its curve fell by 0.77 spreads)
    and that run ended at the majority class. The 12 curves in benchmarks/results/lr-auto-rules/curves.json
    fell by 0.3-4.3 spreads on RT and 8-25 on TREC-6; of the 48 tests in steps.json, both choices over 10x
    off HF's best rate fell by less than 2. Below MIN_FALL_OVER_NOISE the run says its rate is a guess
    (on stderr at once and in summary.json's warnings); retrying at more steps was measured there and
    helped in fp32 but not with bf16 + grouping, so the run does not retry by itself."""
    if len(losses) < 4:  # too short to tell (the spread needs 2 points and the fall more): say nothing
        return math.inf
    third = max(len(losses) // 3, 2)
    spread = statistics.stdev(losses[:third])
    start, end = window(len(smoothed))
    fall = smoothed[start] - min(smoothed[start:end])
    return fall / spread if spread > 0 else math.inf


def guess_warning(found: dict | None) -> str | None:
    """The warning a run gives when its range test's loss did not fall beyond its noise."""
    if not found or found.get("signal") is not False:
        return None
    return (
        f"train.lr=auto chose {found['lr']:.2g} from a range test whose loss fell by only "
        f"{found['fall_over_noise']:.1f} batch-to-batch spreads: the rate is a guess; set train.lr "
        "yourself or raise train.lr_auto_steps"
    )


class _Fixed:
    """Stands in for the schedule during the test: the test sets each step's rate itself."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def step(self) -> None:
        pass


def _snapshot(trainer) -> dict[str, Any]:
    cache = trainer.prefix_cache
    return {
        "weights": {n: p.detach().clone() for n, p in trainer.module.named_parameters() if p.requires_grad},
        "optimizer": copy.deepcopy(trainer.torch_optimizer.state_dict()),
        "torch_rng": ckpt.torch_rng_state(),
        "python_rng": ckpt.python_rng_state(),
        "state": copy.deepcopy(trainer.state),
        "running": (trainer._running.clone(), trainer._running_n),
        "runtimes": [(copy.deepcopy(rt.state()), _clone(rt.tensors())) for rt in trainer.runtimes],
        "cache": (cache.hits, cache.misses, cache.tokens_from_cache) if cache else None,
        "scheduler": trainer.scheduler,
    }


def _clone(tensors: dict) -> dict:
    return {
        k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in tensors.items()
    }


def _restore(trainer, snap: dict[str, Any]) -> None:
    with torch.no_grad():
        for name, p in trainer.module.named_parameters():
            if name in snap["weights"]:
                p.copy_(snap["weights"][name])
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.torch_optimizer.load_state_dict(snap["optimizer"])
    ckpt.restore_torch_rng(snap["torch_rng"])
    ckpt.restore_python_rng(snap["python_rng"])
    trainer.state.__dict__.update(snap["state"].__dict__)  # in place: callers hold `trainer.state`
    trainer._running, trainer._running_n = snap["running"]
    for rt, (state, tensors) in zip(trainer.runtimes, snap["runtimes"], strict=True):
        rt.load(state, tensors)
    if snap["cache"] is not None:
        cache = trainer.prefix_cache
        cache.hits, cache.misses, cache.tokens_from_cache = snap["cache"]
    trainer.scheduler = snap["scheduler"]


def _sweep(trainer, rates: list[float]) -> tuple[list[float], list[float], str]:
    """Losses and smoothed losses of the steps taken, and why the sweep ended."""
    groups = trainer._epoch_batches(0)
    accum = trainer.cfg.train.grad_accum
    steps = [groups[i : i + accum] for i in range(0, len(groups), accum)]
    opt = trainer.torch_optimizer
    trainer.scheduler = _Fixed(opt)
    losses: list[float] = []
    smoothed: list[float] = []
    avg, best = 0.0, math.inf
    for i, rate in enumerate(rates):
        for g in opt.param_groups:
            g["lr"] = rate
        try:
            trainer._optimizer_step(steps[i % len(steps)])
        except UserError:  # nan_policy=stop: the loss or gradient is not finite
            return losses, smoothed, "non-finite loss"
        loss = float(trainer.acc.reduce(trainer._step_loss.detach(), reduction="mean"))
        if not math.isfinite(loss):  # nan_policy=skip dropped the update
            return losses, smoothed, "non-finite loss"
        avg = SMOOTH_BETA * avg + (1 - SMOOTH_BETA) * loss
        losses.append(loss)
        smoothed.append(avg / (1 - SMOOTH_BETA ** (i + 1)))
        best = min(best, smoothed[-1])
        if smoothed[-1] > DIVERGE_FACTOR * best:
            return losses, smoothed, "diverged"
    return losses, smoothed, "end of range"


def range_test(trainer) -> dict[str, Any]:
    """Run the test on `trainer`, put everything back, and return the choice with its curve."""
    tc = trainer.cfg.train
    k = max(min(tc.lr_auto_steps, trainer.steps_per_epoch), MIN_STEPS)
    rates = sweep_rates(tc.lr_auto_min, tc.lr_auto_max, k)
    t0 = time.perf_counter()
    snap = _snapshot(trainer)
    try:
        losses, smoothed, stop = _sweep(trainer, rates)
    finally:
        _restore(trainer, snap)
    if not smoothed:
        raise UserError(
            f"train.lr=auto: the first step of the range test (lr {rates[0]:.2g}) gave a non-finite loss; "
            "check the data, or lower train.lr_auto_min"
        )
    chosen = choose(rates, smoothed, tc.lr_auto_min, tc.lr_auto_max)
    signal = fall_over_noise(losses, smoothed)
    return {
        "lr": chosen,
        "fall_over_noise": signal if math.isfinite(signal) else None,
        "signal": signal >= MIN_FALL_OVER_NOISE,
        "rule": "valley: half way along the longest fall of the smoothed loss (fastai)",
        "range": [tc.lr_auto_min, tc.lr_auto_max],
        "steps_planned": k,
        "steps_run": len(losses),
        "stopped": stop,
        "time_s": time.perf_counter() - t0,  # not in train.train_time_s: the run's own steps only
        "curve": {"lr": rates[: len(losses)], "loss": losses, "smoothed_loss": smoothed},
    }


def apply_lr(trainer, lr: float) -> None:
    """Make `lr` the optimizer's base rate and rebuild the schedule on it (a fresh run only)."""
    from leantune.train.optim import make_scheduler

    opt = trainer.torch_optimizer
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"] = lr
    trainer.scheduler = make_scheduler(opt, trainer.cfg.train, trainer.total_steps)


def resolved_config(cfg, lr: float):
    """A copy of `cfg` whose train.lr is the chosen number (what readers of train.lr see after the test)."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": lr})})


def resolve(trainer) -> None:
    """Under `lr: auto`: on a fresh run, run the test and set its rate; on a resumed one, take the rate the
    checkpoint's state recorded (its optimizer and scheduler already hold it). Then the trainer's config
    names the chosen rate."""
    if trainer.cfg.train.lr != "auto":
        return
    st = trainer.state
    if st.lr_auto is None and st.step > 0:  # --force-resume from a run that had a number
        raise UserError(
            f"train.lr=auto cannot start at step {st.step}: the checkpoint was written with a numeric "
            "train.lr and its schedule is under way; resume with that number, or start a new run"
        )
    if st.lr_auto is None:
        st.lr_auto = range_test(trainer)
        guess = guess_warning(st.lr_auto)
        # said now, so the user can stop the run; summary.json's warnings repeat it
        if guess and trainer.acc.is_main_process:
            print(f"leantune: warning: {guess}", file=sys.stderr, flush=True)
        trainer.cfg = resolved_config(trainer.cfg, st.lr_auto["lr"])
        apply_lr(trainer, st.lr_auto["lr"])
        lo, hi = st.lr_auto["range"]
        trainer.log.log(
            {
                "step": 0,
                "split": "lr_auto",
                "lr": st.lr_auto["lr"],
                "range_min": lo,
                "range_max": hi,
                "steps_run": st.lr_auto["steps_run"],
                "stopped": st.lr_auto["stopped"],
            }
        )
        return
    trainer.cfg = resolved_config(trainer.cfg, st.lr_auto["lr"])
