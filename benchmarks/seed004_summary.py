"""The seed004 memory suites' table and plot: per run the peak RSS, time per optimizer step, the steps and
training seconds until validation accuracy first reaches a stated quality (evaluations every 50 steps),
the final test accuracy, and a memory-vs-quality scatter plot.

    PYTHONPATH=src python benchmarks/seed004_summary.py [--quality 0.70]
    -> benchmarks/results/seed004-memory/summary.json, memory_vs_quality.png
    PYTHONPATH=src python benchmarks/seed004_summary.py --suite seed004-prompt-smollm2 --quality 0.05 \
        --over-zeroshot     # quality = the zeroshot run's final validation accuracy + 0.05
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
ORDER = ("zeroshot", "adamw_full", "lora", "lomo", "adalomo", "mezo_full", "mezo_lora")
TITLES = {
    "seed004-memory": "MiniLM-L6 / Rotten Tomatoes (CPU)",
    "seed004-prompt-smollm2": "SmolLM2-135M prompt classification / Rotten Tomatoes (CPU)",
}


def validation_accuracy(results: Path, run_id: str) -> list[tuple[int, float]]:
    """(step, validation accuracy) of every evaluation of the run, in order."""
    from leantune.bench.time_to_target import curve

    return curve(results / f"{run_id}-r1.metrics.jsonl", "accuracy")


def summarise(results: Path, quality: float) -> dict:
    runs = {}
    for run_id in ORDER:
        art = results / f"{run_id}-r1.json"
        if not art.is_file():
            continue
        a = json.loads(art.read_text())
        steps = a["steps"] or 1
        per_step = a["train_time_s"] / steps
        points = validation_accuracy(results, run_id)
        reached = next((step for step, acc in points if acc >= quality), None)
        test = a["metrics"]["test"]
        runs[run_id] = {
            "methods": a["methods"],
            "peak_rss_mib": a["memory"]["peak_rss_bytes"] / 2**20,
            # the RSS peak while training steps ran (evaluation and loading excluded), when recorded
            "step_peak_rss_mib": (a["memory"].get("step_peak_bytes") or 0) / 2**20 or None,
            "time_per_step_s": per_step,
            "steps": a["steps"],
            "final_validation_accuracy": points[-1][1],
            "steps_to_quality": reached,
            "train_s_to_quality": None if reached is None else reached * per_step,
            "test_accuracy": test["accuracy"],
            "test_majority_accuracy": test["majority_accuracy"],
            "at_majority": test["accuracy"] <= test["majority_accuracy"] + 1e-9,
            "trainable": a["params"].get("trainable"),
        }
    base = runs.get("adamw_full", {}).get("peak_rss_mib")
    for r in runs.values():
        r["rss_vs_adamw"] = r["peak_rss_mib"] / base if base else None
    return {"quality": {"metric": "validation accuracy", "at_least": quality}, "runs": runs}


def plot(summary: dict, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run_id, r in summary["runs"].items():
        ax.scatter(r["peak_rss_mib"], r["test_accuracy"])
        ax.annotate(run_id, (r["peak_rss_mib"], r["test_accuracy"]), fontsize=8)
    majority = next(iter(summary["runs"].values()))["test_majority_accuracy"]
    ax.axhline(majority, linestyle="--", linewidth=0.8, color="grey", label="majority class")
    ax.set_xlabel("peak RSS (MiB, whole process)")
    ax.set_ylabel("test accuracy at the end of the run")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="seed004-memory", choices=sorted(TITLES))
    ap.add_argument("--quality", type=float, default=0.70)
    ap.add_argument("--over-zeroshot", action="store_true", help="quality is added to zeroshot's accuracy")
    args = ap.parse_args()
    results = RESULTS_ROOT / args.suite
    quality = args.quality
    if args.over_zeroshot:
        quality += validation_accuracy(results, "zeroshot")[-1][1]
    summary = summarise(results, quality)
    (results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, results / "memory_vs_quality.png", f"{args.suite}: {TITLES[args.suite]}")
    for run_id, r in summary["runs"].items():
        print(
            f"{run_id:<12} rss {r['peak_rss_mib']:7.0f} MiB  {r['time_per_step_s']:.2f} s/step  "
            f"to {quality:.3f}: {r['steps_to_quality']}  test acc {r['test_accuracy']:.3f}"
        )


if __name__ == "__main__":
    main()
