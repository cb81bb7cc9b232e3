"""Run logs: `metrics.jsonl` (one JSON object per logged step or evaluation) and the experiment trackers
of `output.report_to` (tensorboard, wandb, mlflow, trackio) through accelerate's tracking API.

Why accelerate's trackers and not each library's client: the Accelerator the run already has knows its
main process (only rank 0 logs) and gives one `log(values, step)` for every tracker; leantune only says
where each one writes. Every tracker's files go under the run folder's `trackers/` (a name the run folder
owns, so overwrite and cleanup treat it as the run's): tensorboard events in `trackers/leantune/`, wandb's
offline or synced run in `trackers/wandb/`, mlflow's file store in `trackers/mlruns/` (unless the user set
MLFLOW_TRACKING_URI). trackio keeps its own local store. Offline modes are each library's own
(WANDB_MODE=offline, a file MLFLOW_TRACKING_URI).

What the trackers get: the resolved config (flattened to dotted keys) once; per logged step the loss, lr,
gradient norm, throughput and the process's peak memory; per evaluation its metrics; the methods' logged
decisions (dynamic_rank's rank changes, grad_approx's checks) as they happen; and at the end the test
metrics, the memory summary and every method's report (rank allocations and the like).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from leantune.atomic import write_text_atomic
from leantune.errors import UserError
from leantune.settings import TRACKERS

TRACKERS_DIR = "trackers"
PROJECT = "leantune"  # accelerate's project name: the tensorboard run folder, the wandb/trackio project


def check_trackers(names: list[str]) -> None:
    """Every tracker's package is installed: else one line naming the install, before any model loads."""
    for name in names:
        package = TRACKERS[name]
        if importlib.util.find_spec(package) is None:
            raise UserError(
                f"output.report_to={name} needs the {package} package, which is not installed: "
                f"pip install {package} (or remove {name} from output.report_to)"
            )


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists as dotted keys; leaves kept as they are."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def tracker_values(record: dict[str, Any], prefix: str) -> dict[str, Any]:
    """What the trackers get of one record: finite numbers as scalars under `prefix/`, text as text."""
    out: dict[str, Any] = {}
    fields = {k: v for k, v in record.items() if k not in ("step", "split", "event")}
    for key, value in flatten(fields).items():
        if isinstance(value, bool):
            value = int(value)
        number = isinstance(value, (int, float)) and math.isfinite(value)
        if number or isinstance(value, str):
            out[f"{prefix}/{key}"] = value
    return out


def hparams(config: dict[str, Any]) -> dict[str, Any]:
    """The resolved config as tracker hyperparameters: dotted keys, values bool/int/float/str (None and
    lists as text, which tensorboard's add_hparams accepts)."""
    flat = flatten(config)
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in flat.items()}


class RunLogger:
    """Writes only on the main process; other ranks get a logger that does nothing (accelerate's trackers
    log on the main process only, too)."""

    def __init__(
        self, run_dir: Path, enabled: bool, accelerator=None, trackers: list[str] | None = None
    ) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.run_dir = run_dir
        self.acc = accelerator
        self.trackers = list(trackers or []) if accelerator is not None else []
        self.started = False

    def truncate_after(self, step: int) -> None:
        """On resume, drop what was logged after the checkpoint so the logs read as one uninterrupted run
        (tensorboard: `start` purges its events after `step`)."""
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by the kill: it was after the checkpoint anyway
                continue
            if isinstance(record, dict) and record.get("step", step + 1) <= step:
                keep.append(line)
        write_text_atomic(self.path, "".join(ln + "\n" for ln in keep))

    def start(self, step: int, config: dict[str, Any]) -> None:
        """Start the trackers (after a resume: `step` is the checkpoint's) and give them the config."""
        if self.started or not self.trackers:
            return
        self.started = True
        folder = self.run_dir / TRACKERS_DIR
        kwargs: dict[str, dict] = {
            "tensorboard": {"purge_step": step + 1} if step else {},
            "wandb": {"dir": str(folder), "name": self.run_dir.name},
            "mlflow": {"logging_dir": str(folder / "mlflow-artifacts"), "run_name": self.run_dir.name},
            "trackio": {"name": self.run_dir.name},
        }
        if self.acc.is_main_process:
            folder.mkdir(exist_ok=True)
            if "mlflow" in self.trackers:
                _local_mlflow_store(folder / "mlruns")
        self.acc.init_trackers(PROJECT, config=hparams(config), init_kwargs=kwargs)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.started:
            prefix = record.get("split") or record.get("event") or "train"
            values = tracker_values(record, prefix)
            if prefix == "train":
                values.update(tracker_values(_memory_now(), "memory"))
            self.acc.log(values, step=record["step"])

    def final(self, step: int, summary: dict[str, Any]) -> None:
        """The end of the run for the trackers: test metrics, memory and each method's report."""
        if not (self.enabled and self.started):
            return
        values = tracker_values(summary.get("test") or {}, "test")
        values.update(tracker_values(summary.get("memory") or {}, "memory"))
        values.update(tracker_values(summary.get("method_reports") or {}, "methods"))
        self.acc.log(values, step=step)

    def close(self) -> None:
        """Finish every tracker (flush and close its files). Not `accelerator.end_training()`: that also
        destroys the process group, which the run still uses after this (and a later run in the process)."""
        if self.started:
            for tracker in self.acc.trackers:
                tracker.finish()
            self.acc.trackers.clear()
            self.started = False


def _memory_now() -> dict[str, Any]:
    from leantune.memory.measure import peak_memory

    return {k.replace("_bytes", "_mib"): v / 2**20 for k, v in peak_memory().items()}


def _local_mlflow_store(store: Path) -> None:
    """mlflow writes to the run folder unless the user pointed MLFLOW_TRACKING_URI elsewhere."""
    import os

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        mlflow.set_tracking_uri(store.resolve().as_uri())
