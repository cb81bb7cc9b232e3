"""Time to a fixed quality target, from a suite's artefacts and their eval curves, and the check of
issue 20 item 3: is `methods: auto`'s pick within 10% of the best hand-picked configuration?

    PYTHONPATH=src python -m leantune.bench.time_to_target auto-pick --target 0.75 --auto auto --write

Time to target = the training time (summary.json's `epoch_train_time_s`, evaluation excluded) until the
first validation record of `<run>-r1.metrics.jsonl` whose metric reaches the target. Steps within an
epoch are taken to cost the same (the epoch's time x the share of its steps done); epochs differ (a
frozen-prefix cache makes later ones cheaper), so each epoch's own time is used. A run that never
reaches the target has no time (null) and cannot be the best.

Why here and not in the report: the report compares throughput at equal steps; this compares the
time to equal quality, which needs the eval curve.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

RESULTS = Path("benchmarks/results")
OUTPUT = "time_to_target.json"
EVIDENCE = "evidence.json"  # what recipes/auto.py's constants were read from
WITHIN = 0.10  # issue 20 item 3: auto within 10% of the best hand-picked time to quality


def validation_records(metrics_path: Path, metric: str) -> list[dict]:
    """Every validation record of a metrics.jsonl that carries `metric`, in order."""
    records = (json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines())
    return [r for r in records if r.get("split") == "validation" and metric in r]


def curve(metrics_path: Path, metric: str) -> list[tuple[int, float]]:
    """(step, value) of every validation record, in order."""
    return [(int(r["step"]), float(r[metric])) for r in validation_records(metrics_path, metric)]


def time_at_step(step: int, steps: int, epoch_times: list[float]) -> float:
    """Training seconds until optimizer step `step` of a run of `steps` over len(epoch_times) epochs."""
    per_epoch = math.ceil(steps / len(epoch_times))
    done = min(step // per_epoch, len(epoch_times))
    t = sum(epoch_times[:done])
    if done < len(epoch_times):
        in_epoch = min(per_epoch, steps - done * per_epoch)
        t += epoch_times[done] * (step - done * per_epoch) / in_epoch
    return t


def run_time_to_target(artefact: dict, metrics_path: Path, metric: str, target: float) -> dict[str, Any]:
    points = curve(metrics_path, metric)
    hit = next(((s, v) for s, v in points if v >= target), None)
    times = artefact["epoch_train_time_s"]
    return {
        "methods": artefact["methods"],
        "method_config": artefact["config"]["methods"],
        "lr": artefact["config"]["train"]["lr"],
        "cache_frozen_prefix": artefact["config"]["train"]["cache_frozen_prefix"],
        "step_reached": hit[0] if hit else None,
        "value_reached": hit[1] if hit else None,
        "time_to_target_s": time_at_step(hit[0], artefact["steps"], times) if hit else None,
        "train_time_s": artefact["train_time_s"],
        # the run's own wall time outside training and evaluation: loading, saving, and for auto its planning
        "setup_s": artefact["run_wall_time_s"] - artefact["train_time_s"] - (artefact["eval_time_s"] or 0.0),
        "final_validation": points[-1][1] if points else None,
        "best_validation": max((v for _, v in points), default=None),
        "test": artefact["metrics"].get("test", {}).get(metric),
        "curve": points,
        "load_avg_1m_5m_15m": artefact["machine"].get("load_avg_1m_5m_15m"),
        "methods_auto": artefact.get("methods_auto"),
    }


def compare(suite: str, target: float, auto_id: str, metric: str = "accuracy", root: Path = RESULTS) -> dict:
    folder = root / suite
    runs: dict[str, dict] = {}
    for path in sorted(folder.glob("*-r1.json")):
        run_id = path.name.removesuffix("-r1.json")
        runs[run_id] = run_time_to_target(
            json.loads(path.read_text(encoding="utf-8")),
            folder / f"{run_id}-r1.metrics.jsonl",
            metric,
            target,
        )
    # every run whose id starts with the auto run's id is an auto variant, not a hand-picked configuration
    hand = {k: v for k, v in runs.items() if not k.startswith(auto_id) and v["time_to_target_s"] is not None}
    best = min(hand, key=lambda k: hand[k]["time_to_target_s"]) if hand else None
    auto_t = runs.get(auto_id, {}).get("time_to_target_s")
    ratio = auto_t / hand[best]["time_to_target_s"] if best and auto_t is not None else None
    return {
        "suite": suite,
        "metric": metric,
        "target": target,
        "within": WITHIN,
        "runs": runs,
        "best_hand_picked": best,
        "best_hand_picked_time_s": hand[best]["time_to_target_s"] if best else None,
        "auto_run": auto_id,
        "auto_pick": (runs.get(auto_id, {}).get("methods_auto") or {}).get("chosen"),
        "auto_time_s": auto_t,
        "auto_over_best": ratio,
        "auto_within": ratio is not None and ratio <= 1 + WITHIN,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("suite")
    ap.add_argument("--target", type=float, required=True)
    ap.add_argument("--metric", default="accuracy")
    ap.add_argument("--auto", default="auto", help="the run id of the methods: auto run")
    ap.add_argument("--write", action="store_true", help=f"write benchmarks/results/SUITE/{OUTPUT}")
    ap.add_argument("--evidence", action="store_true", help=f"also write SUITE/{EVIDENCE} (recipes/auto.py)")
    ns = ap.parse_args(argv)
    if ns.evidence:
        from leantune.atomic import write_json_atomic

        (RESULTS / ns.suite).mkdir(parents=True, exist_ok=True)
        write_json_atomic(RESULTS / ns.suite / EVIDENCE, evidence())
    out = compare(ns.suite, ns.target, ns.auto, ns.metric)
    for run_id, r in out["runs"].items():
        t = r["time_to_target_s"]
        reached = f"{t:7.1f} s (step {r['step_reached']})" if t is not None else "   never"
        print(f"{run_id:24s} {reached}  final {r['final_validation']}  train {r['train_time_s']:.1f} s")
    best, pick, ratio = out["best_hand_picked"], out["auto_pick"], out["auto_over_best"]
    print(f"best hand-picked: {best}; auto ({pick}) / best = {ratio}")
    if ns.write:
        from leantune.atomic import write_json_atomic

        write_json_atomic(RESULTS / ns.suite / OUTPUT, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# --- the evidence behind recipes/auto.py's constants ---------------------------------------------------

#: (suite, run) of each family at its best rate in seed003-unified on RT (validation at steps 100, 200)
STEP_EVIDENCE = {
    "full": ("seed003-unified", "rt_full_lr1e-4_s0"),
    "lora": ("seed003-unified", "rt_lora_lr3e-3_s0"),
    "freeze3": ("seed003-unified", "rt_freeze_lr2e-4_s0"),
}
TIME_EVIDENCE = ("seed000-table2-core", ("full", "lora", "freeze"))


def steps_to_reach(points: list[tuple[int, float]], value: float) -> float | None:
    """The step at which a curve reaches `value`, linear between its evaluations (None: never)."""
    prev = (0, -math.inf)
    for step, v in points:
        if v >= value:
            if prev[1] == -math.inf:
                return float(step)
            return prev[0] + (step - prev[0]) * (value - prev[1]) / (v - prev[1])
        prev = (step, v)
    return None


def evidence(root: Path = RESULTS) -> dict:
    """Step multipliers (steps to reach full's accuracy at its first evaluation, over full's steps) and
    each family's measured step time over its FLOP-predicted time, from the committed artefacts."""
    from leantune.models.flop_profile import flops_per_token

    curves = {
        k: curve(root / suite / f"{run}-r1.metrics.jsonl", "accuracy")
        for k, (suite, run) in STEP_EVIDENCE.items()
    }
    ref_step, ref_value = curves["full"][0]
    multipliers = {k: steps_to_reach(c, ref_value) / ref_step for k, c in curves.items()}
    suite, runs = TIME_EVIDENCE
    arts = {r: json.loads((root / suite / f"{r}-r1.json").read_text(encoding="utf-8")) for r in runs}
    flops = {r: flops_per_token(a["params"]["flop_profile"]) for r, a in arts.items()}
    time_ratio = {r: arts[r]["train_time_s"] / arts["full"]["train_time_s"] for r in runs}
    flop_ratio = {r: flops[r] / flops["full"] for r in runs}
    return {
        "curves": {
            k: {"suite": STEP_EVIDENCE[k][0], "run": STEP_EVIDENCE[k][1], "points": c}
            for k, c in curves.items()
        },
        "reference": {"step": ref_step, "accuracy": ref_value},
        "steps_multiplier": multipliers,
        "step_time": {
            "suite": suite,
            "train_time_s": {r: arts[r]["train_time_s"] for r in runs},
            "time_ratio": time_ratio,
            "flop_ratio": flop_ratio,
            "overhead": {r: time_ratio[r] / flop_ratio[r] for r in runs},
        },
    }
