"""One benchmark artefact: the JSON record of one (run, repeat), built from the run's summary.json.

Why summary.json is the source of truth: the training process itself measured its train time, samples
and peak memory, and computed its metrics; the runner only adds what the run cannot know (the suite,
the repeat, the wall time of the whole subprocess, the matmul peak of this invocation, the size on
disk). Artefacts are written to a temporary file and renamed, so a killed suite never leaves a torn
artefact that would later count as finished.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

SCHEMA = 1


def dir_size(path: Path) -> int:
    """Bytes of all files under `path` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def weights_size(path: Path) -> int:
    """Bytes of the weight files (safetensors / bin / pt) under `path`, without tokenizer and config files."""
    if not path.is_dir():
        return 0
    return sum(
        f.stat().st_size
        for f in path.rglob("*")
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt", ".pth")
    )


def artefact_path(folder: Path, key: str) -> Path:
    return folder / f"{key}.json"


def metrics_path(folder: Path, key: str) -> Path:
    return folder / f"{key}.metrics.jsonl"


def read_artefact(path: Path) -> dict | None:
    """The artefact at `path` when it is a complete one of this schema, else None (then it is rerun)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("schema") == SCHEMA else None


def load_artefacts(folder: Path) -> list[dict]:
    """Every complete artefact in a suite's results folder, ordered by repeat then file name."""
    found = [a for p in sorted(folder.glob("*-r*.json")) if (a := read_artefact(p)) is not None]
    return sorted(found, key=lambda a: (a["repeat"], a["run_id"]))


def time_per_epoch(summary: dict) -> float:
    """Training seconds per full pass over the train split (extrapolated when max_steps cut it short)."""
    cfg, train = summary["config"]["train"], summary["train"]
    world = summary.get("world_size", 1)
    batches = math.ceil(summary["data"]["train"] / max(world, 1) / cfg["batch_size"])
    steps_per_epoch = math.ceil(batches / cfg["grad_accum"])
    return train["train_time_s"] * steps_per_epoch / max(train["steps"], 1)


def params_with_active_share(summary: dict) -> dict:
    """The run's parameter counts, plus the mean share that really trained where a method reports one.

    A method that trains a changing subset (LISA) leaves every parameter trainable over the run, so the
    count taken at the start says 100%; its runtime reports `trainable_params_active`, the mean over steps
    of the parameters that had gradients and optimizer state, and tables show that share instead.
    """
    params = dict(summary["params"])
    reports = (summary.get("method_reports") or {}).values()
    active = [r["trainable_params_active"] for r in reports if "trainable_params_active" in r]
    if active:
        params["trainable_active"] = min(active)
        params["trainable_active_pct"] = 100.0 * min(active) / max(params["total"], 1)
    return params


def portable(value, run_dir: Path, root: Path | None = None):
    """`value` with this machine's paths taken out: the run's scratch folder becomes `<run>`, paths under
    `root` (the working directory: the repository when benchmarks run) become relative, the Python
    executable becomes `python`; an artefact then reads the same wherever it was made."""
    import sys

    root = (root or Path.cwd()).resolve()
    if isinstance(value, dict):
        return {k: portable(v, run_dir, root) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, run_dir, root) for v in value]
    if not isinstance(value, str):
        return value
    if value == sys.executable:
        return "python"
    value = value.replace(str(run_dir), "<run>")
    return value.replace(f"{root}/", "")


def build_artefact(
    *,
    suite: str,
    invocation: str,
    run_id: str,
    kind: str,
    repeat: int,
    overrides: list[str],
    command: list[str],
    summary: dict,
    wall_time_s: float,
    run_dir: Path,
    peak: dict | None,
    flops: dict,
) -> dict:
    """One run's artefact: where it came from, its time, its memory and size, its metrics, and the
    method and machine reports; the report and the docs read only this, never the run folder."""
    cfg = portable(summary["config"], run_dir)
    overrides, command = portable(overrides, run_dir), portable(command, run_dir)
    return {
        "schema": SCHEMA,
        "suite": suite,
        "invocation": invocation,  # runs of one `leantune bench` call were measured side by side
        "run_id": run_id,
        "kind": kind,
        "repeat": repeat,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "overrides": overrides,
        "command": command,
        "methods": summary["methods"],
        "task": summary["task"],
        "seed": cfg["train"]["seed"],
        "config": cfg,
        "versions": summary["versions"],
        "machine": summary["machine"],
        "world_size": summary.get("world_size", 1),
        "data": summary["data"],
        **_timing(summary, wall_time_s),
        **_footprint(summary, run_dir),
        "metrics": _metrics(summary),
        "baseline": summary.get("baseline"),
        "method_reports": summary.get("method_reports") or {},  # e.g. grad_approx's cosines and step times
        **({"methods_auto": summary["methods_auto"]} if "methods_auto" in summary else {}),  # methods: auto
        **_lr_auto(summary),
        "matmul_peak": peak,
        "flops": flops,
    }


def _lr_auto(summary: dict) -> dict:
    """train.lr=auto: the rate the range test chose and its seconds (not in train_time_s; time to
    quality adds them), without the curve (it stays in the run's summary.json)."""
    found = summary.get("lr_auto")
    return {"lr_auto": {k: found.get(k) for k in ("lr", "time_s", "steps_run")}} if found else {}


def _timing(summary: dict, wall_time_s: float) -> dict:
    """How long the run took, from the outside (the runner's wall time) and the inside (summary.json)."""
    train = summary["train"]
    return {
        # the whole subprocess (imports, loading, training, evaluation, saving) as the runner saw it
        "wall_time_s": wall_time_s,
        "run_wall_time_s": summary.get("wall_time_s"),
        "train_time_s": train["train_time_s"],
        "eval_time_s": train.get("eval_time_s"),
        "time_per_epoch_s": time_per_epoch(summary),
        "epoch_train_time_s": train.get("epoch_train_time_s"),  # measured, per epoch (leantune runs)
        "cpu_utilisation": train.get("cpu_utilisation"),  # cores busy while training (leantune runs)
        "gpu_utilisation_pct": train.get("gpu_utilisation_pct"),  # CUDA with NVML only
        "prefix_cache": train.get("prefix_cache"),
        "steps": train["steps"],
        "epochs_completed": train["epochs_completed"],
        "samples_per_s": train["samples_per_s"],
        "tokens_per_s": train["tokens_per_s"],
    }


def _footprint(summary: dict, run_dir: Path) -> dict:
    """Memory (the CUDA peak where there is one, else the process's RSS), parameters and size on disk."""
    return {
        "memory": summary["memory"],
        "peak_memory_bytes": summary["memory"].get(
            "cuda_max_allocated_bytes", summary["memory"]["peak_rss_bytes"]
        ),
        "params": params_with_active_share(summary),
        "model_size_bytes": dir_size(run_dir / "model"),  # the adapter / model folder, tokenizer included
        "weights_size_bytes": weights_size(run_dir / "model"),
    }


def _metrics(summary: dict) -> dict:
    """test: the weights the run kept (leantune restores the best by validation); validation: its last
    evaluation (the final weights); best: the best validation value and its step."""
    train = summary["train"]
    return {
        "test": summary.get("test") or {},
        "validation": summary.get("validation") or {},
        "mmlu": summary.get("mmlu"),  # k-shot accuracy after training (eval.mmlu_shots), else None
        "confusion": summary.get("confusion"),  # classification: test counts (labels, matrix[true][pred])
        "best": {
            "metric": train.get("metric"),
            "value": train.get("best_metric"),
            "step": train.get("best_step"),
        },
    }
