"""summary.json: what one finished run records about itself, in one typed place.

Two producers write it: `leantune train` (`leantune.recipes.train`) and the transformers.Trainer baseline
(`leantune.bench.hf_baseline`), whose summary the bench runner reads exactly like a leantune run's. Both
build a `RunSummary`, so they cannot drift apart. The bench artefact, the report, the model card, the
docs generator and the tests read its keys; `to_dict` keeps them (and their order) as they were when
both producers built the dict by hand. A field left `None` is a key the producer does not write (the
baseline has no method reports, a run without MMLU no `mmlu`); an empty dict or list is still written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leantune.atomic import write_text_atomic

__all__ = ["RunSummary", "TrainStats", "format_summary", "format_table", "per_second", "quality_warnings"]


def per_second(count: float, seconds: float) -> float:
    """A throughput that stays finite for a run that trained for (almost) no time."""
    return count / max(seconds, 1e-9)


def _present(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """The pairs whose value is not `None`, in order: `None` marks a key this producer does not write."""
    return {key: value for key, value in pairs if value is not None}


@dataclass
class TrainStats:
    """summary.json's `train` section: how training went and how long it took."""

    steps: int
    epochs_completed: int
    stopped_early: bool
    resumed: bool
    train_time_s: float
    eval_time_s: float
    samples_per_s: float
    tokens_per_s: float
    best_step: int | None
    best_metric: float | None
    metric: str
    skipped_steps: int | None = None  # leantune's loop (train.nan_policy=skip); not the baseline
    resume_forced_changes: list[str] | None = None  # only when --force-resume let something change
    epoch_train_time_s: list[float] | None = None  # leantune's loop; not the baseline
    prefix_cache: dict | None = None  # only when the frozen-prefix cache ran
    # leantune's loop: process CPU seconds over the training steps, and that / train_time_s (the mean
    # number of cores the run kept busy; on a shared machine lower than its threads means it waited)
    train_cpu_time_s: float | None = None
    gpu_utilisation_pct: float | None = None  # CUDA with NVML: the mean of the samples at each log line

    @property
    def cpu_utilisation(self) -> float | None:
        """Cores busy on average while training (CPU seconds / wall seconds of the steps)."""
        if self.train_cpu_time_s is None:
            return None
        return self.train_cpu_time_s / max(self.train_time_s, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        # best_step/best_metric are written even when None (no validation metric): readers expect them
        return {
            "steps": self.steps,
            "epochs_completed": self.epochs_completed,
            "stopped_early": self.stopped_early,
            **_present([("skipped_steps", self.skipped_steps)]),
            "resumed": self.resumed,
            **_present([("resume_forced_changes", self.resume_forced_changes)]),
            "train_time_s": self.train_time_s,
            **_present([("epoch_train_time_s", self.epoch_train_time_s)]),
            **_present(
                [
                    ("train_cpu_time_s", self.train_cpu_time_s),
                    ("cpu_utilisation", self.cpu_utilisation),
                    ("gpu_utilisation_pct", self.gpu_utilisation_pct),
                ]
            ),
            "eval_time_s": self.eval_time_s,
            "samples_per_s": self.samples_per_s,
            "tokens_per_s": self.tokens_per_s,
            "best_step": self.best_step,
            "best_metric": self.best_metric,
            "metric": self.metric,
            **_present([("prefix_cache", self.prefix_cache)]),
        }


@dataclass
class RunSummary:
    """The whole of summary.json. `params`, `data`, the metric dicts and the environment stay plain
    dicts: their keys come from elsewhere (parameter counts, splits, metric functions, versions)."""

    run_dir: str
    task: str
    methods: list[str]
    params: dict[str, Any]
    data: dict[str, int]  # rows per split
    train: TrainStats
    validation: dict[str, Any]
    test: dict[str, Any]
    memory: dict[str, Any]  # leantune.memory.measure.peak_memory()
    world_size: int
    versions: dict[str, str]
    machine: dict[str, Any]
    config: dict[str, Any]  # the validated run config, as JSON
    method_reports: dict[str, dict] | None = None  # leantune runs: each method's own numbers
    mmlu: dict[str, Any] | None = None  # when eval.mmlu_shots is set
    confusion: dict[str, Any] | None = None  # classification: test counts {labels, matrix[true][pred]}
    weights_sha256_per_rank: list[str] | None = None  # leantune runs: DDP must end identical
    distributed: str | None = None  # leantune runs: fsdp, ddp or none
    baseline: dict[str, Any] | None = None  # the HF baseline: what its framework did
    rlhf: dict[str, Any] | None = None  # tasks dpo/ppo: reward and KL over training (recipes/rlhf.py)
    wall_time_s: float | None = None  # set last, just before the summary is written
    warnings: list[str] | None = None  # leantune runs: quality_warnings
    prompt_head: dict | None = None  # task prompt_classification: models/prompt_head.setup_label_words
    lr_auto: dict[str, Any] | None = None  # train.lr=auto: chosen rate, range, curve (train/lr_find.py)
    methods_auto: dict[str, Any] | None = None  # methods: auto: the choice and its reasons (recipes/auto.py)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": self.run_dir,
            "task": self.task,
            "methods": self.methods,
            **_present([("method_reports", self.method_reports), ("prompt_head", self.prompt_head)]),
            "params": self.params,
            "data": self.data,
            "train": self.train.to_dict(),
            **_present([("lr_auto", self.lr_auto), ("methods_auto", self.methods_auto)]),
            "validation": self.validation,
            "test": self.test,
            **_present([("mmlu", self.mmlu), ("confusion", self.confusion), ("rlhf", self.rlhf)]),
            "memory": self.memory,
            "world_size": self.world_size,
            **_present([("distributed", self.distributed)]),
            **_present([("weights_sha256_per_rank", self.weights_sha256_per_rank)]),
            "versions": self.versions,
            "machine": self.machine,
            "config": self.config,
            **_present(
                [("baseline", self.baseline), ("wall_time_s", self.wall_time_s), ("warnings", self.warnings)]
            ),
        }

    def to_json(self) -> str:
        """The file's text: indented, non-JSON values (paths) as strings, one trailing newline."""
        return json.dumps(self.to_dict(), indent=2, default=str) + "\n"

    def write(self, path: Path) -> None:
        """Written atomically: the bench runner and `--resume` never read a torn summary."""
        write_text_atomic(path, self.to_json())


#: (metric, its do-nothing baseline, whether lower is better, what the baseline is): regression and
#: multi-label; classification's accuracy vs majority class follows below
_BASELINES = (
    ("mse", "baseline_mse", True, "a constant prediction (the mean score)"),
    ("micro_f1", "majority_micro_f1", False, "predicting each label's majority value"),
)


def quality_warnings(summary: RunSummary | dict) -> list[str]:
    """What the user must hear about a finished run: it learned nothing (`_no_learning`), or its
    `lr: auto` rate came from a range test whose loss did not fall beyond its noise (train/lr_find.py)."""
    s = summary.to_dict() if isinstance(summary, RunSummary) else summary
    from leantune.train.lr_find import guess_warning

    guess = guess_warning(s.get("lr_auto"))
    return _no_learning(s) + ([guess] if guess else [])


def _no_learning(s: dict) -> list[str]:
    """A run that ends at or below its do-nothing baseline (the majority class; for regression the MSE
    of predicting the mean; for multi-label the micro F1 of each label's majority value) learned
    nothing: say so loudly."""
    for split in ("test", "validation"):
        metrics = s.get(split) or {}
        for name, base, lower, what in _BASELINES:
            got, ref = metrics.get(name), metrics.get(base)
            if got is None or ref is None:
                continue
            if (got >= ref - 1e-9) if lower else (got <= ref + 1e-9):
                return [
                    f"{split} {name} {got:.4f} is no better than {what} ({ref:.4f}): the run did not "
                    "learn the task; try a larger train.lr or more epochs, and check the labels"
                ]
            return []
        acc, majority = metrics.get("accuracy"), metrics.get("majority_accuracy")
        if acc is not None and majority is not None:
            if acc <= majority + 1e-9:
                return [
                    f"{split} accuracy {acc:.4f} is at or below the majority class ({majority:.4f}): the "
                    "run did not learn the task; try a larger train.lr or more epochs, and check the labels"
                ]
            return []
    return []


def format_table(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * max(len(title), width + 20)]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


_SHOWN_METRICS = (
    "accuracy",
    "f1",
    "precision",
    "recall",
    "mcc",
    "majority_accuracy",
    "mse",
    "rmse",
    "mae",
    "pearson",
    "spearman",
    "baseline_mse",
    "micro_f1",
    "macro_f1",
    "micro_precision",
    "micro_recall",
    "subset_accuracy",
    "majority_micro_f1",
    "loss",
    "perplexity",
    "bleu",
    "chrf",
    "rouge1",
    "rouge2",
    "rougeL",
    "exact_match",
)


def _run_rows(s: dict) -> list[tuple[str, str]]:
    """What was trained, how long it took and the memory it used."""
    p, t, m = s["params"], s["train"], s["memory"]
    cuda = m.get("cuda_max_allocated_bytes")
    return [
        ("methods", " + ".join(s["methods"])),
        ("trainable params", f"{p['trainable']:,} of {p['total']:,} ({p['trainable_pct']:.3f}%)"),
        (
            "steps",
            f"{t['steps']} ({t['epochs_completed']} epochs)"
            + (f", {t['skipped_steps']} skipped for a NaN/inf loss" if t.get("skipped_steps") else ""),
        ),
        ("wall time", f"{s.get('wall_time_s', 0):.1f} s (training {t['train_time_s']:.1f} s)"),
        ("samples/s", f"{t['samples_per_s']:.1f}"),
        (
            "peak memory",
            f"{m['peak_rss_bytes'] / 2**20:.0f} MiB RSS"
            + (f", {cuda / 2**20:.0f} MiB CUDA" if "cuda_max_allocated_bytes" in m else "")
            + (f"; largest step {step / 2**20:.0f} MiB" if (step := m.get("step_peak_bytes")) else "")
            + {
                "train_step": ", set by a training step",
                "outside_steps": ", set outside the training steps (evaluation, loading or saving)",
            }.get(m.get("peak_phase"), ""),
        ),
    ]


def format_summary(summary: RunSummary | dict) -> str:
    """The console table printed at the end of `leantune train`, from the summary object or its dict."""
    s = summary.to_dict() if isinstance(summary, RunSummary) else summary
    rows = _run_rows(s)
    for split in ("validation", "test"):
        metrics = s.get(split) or {}
        rows += [(f"{split} {k}", f"{metrics[k]:.4f}") for k in _SHOWN_METRICS if k in metrics]
    if "mmlu" in s:
        mmlu = s["mmlu"]
        rows.append((f"MMLU {mmlu['shots']}-shot accuracy", f"{mmlu['accuracy']:.4f} (n={mmlu['n']})"))
    rows.append(("run folder", s["run_dir"]))
    return format_table(rows, "leantune summary")
