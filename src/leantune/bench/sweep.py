"""Best-of-sweep selection and seed spread over a suite's artefacts (`python -m leantune.bench.sweep`).

A sweep suite names its runs `<group>_lr<rate>_s<seed>` (e.g. `rt_lora_lr1e-3_s0`): the group is a
(dataset, method) pair, the rate and seed are the run's own `train.lr` and `train.seed` (read from each
artefact's config, the id only groups). The procedure it supports, to spend compute on seeds only at
the rate that won:

1. run every group's rates on the sweep seed (`leantune bench SUITE --only <the _s0 ids>`);
2. `python -m leantune.bench.sweep SUITE --next` picks, per group, the rate with the best *validation*
   metric on the sweep seed (never the test split) and prints the ids of the other seeds at that rate;
3. run those (`leantune bench SUITE --only ...`), then `python -m leantune.bench.sweep SUITE --write`
   writes `sweep.json` beside the artefacts: per group the chosen rate, the mean, sample standard
   deviation, min and max over seeds of the test metrics, time relative to full fine-tuning (paired per
   seed with the dataset's `full` group), peak memory, trainable %, CPU (and GPU) utilisation, and
   whether the runs ended at the majority class. The docs read their figures from that file.

Our own code because the runner runs a fixed list (`leantune bench`), and neither it nor the report
chooses among runs; the selection is a few lines over the artefacts the runner already writes.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from leantune.bench.artefact import load_artefacts
from leantune.errors import UserError

RUN_ID = re.compile(r"^(?P<group>.+)_lr(?P<lr>[^_]+)_s(?P<seed>\d+)$")
#: test metrics summarised per group (classification)
TEST_METRICS = (
    "accuracy",
    "macro_f1",
    "macro_precision",
    "macro_recall",
    "f1",
    "precision",
    "recall",
    "mcc",
)
#: a group "ends at the majority class" when its mean test accuracy is within this of the majority share
MAJORITY_MARGIN = 0.02


def group_of(run_id: str) -> str | None:
    m = RUN_ID.match(run_id)
    return m["group"] if m else None


def _lr(a: dict) -> float:
    """The run's rate: train.lr, or under `lr: auto` the rate its range test chose."""
    lr = a["config"]["train"]["lr"]
    return float(a["lr_auto"]["lr"]) if lr == "auto" else float(lr)


def _validation(a: dict, metric: str) -> float:
    value = a["metrics"]["validation"].get(metric)
    return float("-inf") if value is None else float(value)


def groups(artefacts: list[dict]) -> dict[str, list[dict]]:
    """The artefacts of sweep runs, by group, in the order the suite ran them."""
    out: dict[str, list[dict]] = {}
    for a in artefacts:
        g = group_of(a["run_id"])
        if g is not None:
            out.setdefault(g, []).append(a)
    return out


def choose(runs: list[dict], sweep_seed: int = 0, metric: str = "accuracy") -> float:
    """The rate whose sweep-seed run has the best validation `metric` (ties: the smaller rate)."""
    swept = [a for a in runs if a["seed"] == sweep_seed]
    if not swept:
        raise UserError(f"group {group_of(runs[0]['run_id'])}: no run with the sweep seed {sweep_seed}")
    best = max(swept, key=lambda a: (_validation(a, metric), -_lr(a)))
    return _lr(best)


def spread(values: list[float]) -> dict[str, float | int]:
    """mean, sample sd (`std`), min, max and n of a non-empty list (sweeps, time to quality)."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _figure(runs: list[dict], get: Callable[[dict], float | None]) -> dict | None:
    values = [v for a in runs if (v := get(a)) is not None]
    return spread(values) if values else None


def _at_majority(accuracy: dict | None, majority: dict | None) -> bool:
    return bool(accuracy and majority and accuracy["mean"] <= majority["mean"] + MAJORITY_MARGIN)


def _time_vs_full(runs: list[dict], full: list[dict]) -> dict | None:
    """train_time_s over the full fine-tuning run of the same dataset and seed, per seed."""
    by_seed = {a["seed"]: a["train_time_s"] for a in full}
    ratios = [a["train_time_s"] / by_seed[a["seed"]] for a in runs if by_seed.get(a["seed"])]
    return spread(ratios) if ratios else None


def summarise(artefacts: list[dict], sweep_seed: int = 0, metric: str = "accuracy") -> dict:
    """Per group: the chosen rate, every swept rate's validation metric, and the figures over seeds."""
    by_group = groups(artefacts)
    chosen = {g: choose(runs, sweep_seed, metric) for g, runs in by_group.items()}
    at = {g: [a for a in runs if _lr(a) == chosen[g]] for g, runs in by_group.items()}
    out = {}
    for g, runs in by_group.items():
        dataset = g.split("_", 1)[0]
        full = at.get(f"{dataset}_full", [])
        test = {k: _figure(at[g], lambda a, k=k: a["metrics"]["test"].get(k)) for k in TEST_METRICS}
        majority = _figure(at[g], lambda a: a["metrics"]["test"].get("majority_accuracy"))
        out[g] = {
            "methods": at[g][0]["methods"],
            "lr": chosen[g],
            "sweep": {f"{_lr(a):g}": _validation(a, metric) for a in runs if a["seed"] == sweep_seed},
            "seeds": sorted(a["seed"] for a in at[g]),
            "test": test,
            "majority_accuracy": majority["mean"] if majority else None,
            "at_majority": _at_majority(test["accuracy"], majority),
            "time_vs_full": _time_vs_full(at[g], full),
            "train_time_s": _figure(at[g], lambda a: a["train_time_s"]),
            "peak_memory_mib": _figure(at[g], lambda a: a["peak_memory_bytes"] / 2**20),
            "trainable_pct": at[g][0]["params"]["trainable_pct"],
            "trainable": at[g][0]["params"]["trainable"],
            "cpu_utilisation": _figure(at[g], lambda a: a.get("cpu_utilisation")),
            "gpu_utilisation_pct": _figure(at[g], lambda a: a.get("gpu_utilisation_pct")),
            "device": at[g][0]["machine"].get("device"),
        }
    return out


def next_runs(
    suite_ids: list[str], artefacts: list[dict], seeds: list[int], sweep_seed: int = 0
) -> list[str]:
    """The suite's ids of the other seeds at each group's chosen rate that have no artefact yet."""
    by_group = groups(artefacts)
    done = {a["run_id"] for a in artefacts}
    ids = []
    for run_id in suite_ids:
        m = RUN_ID.match(run_id)
        if m is None or run_id in done or int(m["seed"]) == sweep_seed or int(m["seed"]) not in seeds:
            continue
        runs = by_group.get(m["group"])
        if runs and float(m["lr"]) == choose(runs, sweep_seed):
            ids.append(run_id)
    return ids


def main(argv: list[str] | None = None) -> int:
    from leantune.atomic import write_json_atomic
    from leantune.bench.suite import load_suite, resolve_suite_path

    doc = (__doc__ or "").split("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m leantune.bench.sweep", description=doc)
    parser.add_argument("suite")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--next", action="store_true", help="print the ids still to run at the chosen rates")
    parser.add_argument("--write", action="store_true", help="write sweep.json beside the artefacts")
    args = parser.parse_args(argv)
    try:
        suite = load_suite(resolve_suite_path(args.suite))
        folder = args.results / suite.name
        artefacts = load_artefacts(folder)
        if args.next:
            print(" ".join(next_runs([r.id for r in suite.runs], artefacts, args.seeds)))
        if args.write:
            write_json_atomic(folder / "sweep.json", summarise(artefacts))
            print(f"wrote {folder / 'sweep.json'}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
