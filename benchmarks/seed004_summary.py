"""The seed004-memory suite's table and plot: per run the peak RSS, time per optimizer step, the steps and
training seconds until validation accuracy first reaches a stated quality (evaluations every 50 steps),
the final test accuracy, and a memory-vs-quality scatter plot.

    PYTHONPATH=src python benchmarks/seed004_summary.py [--quality 0.70]
    -> benchmarks/results/seed004-memory/summary.json, memory_vs_quality.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "seed004-memory"
ORDER = ("adamw_full", "lora", "lomo", "adalomo", "mezo_full", "mezo_lora")


def first_reaching(metrics_file: Path, quality: float) -> int | None:
    """The first optimizer step whose validation accuracy is at least `quality` (None: never)."""
    for line in metrics_file.read_text().splitlines():
        row = json.loads(line)
        if row.get("split") == "validation" and row.get("accuracy", 0.0) >= quality:
            return int(row["step"])
    return None


def summarise(quality: float) -> dict:
    runs = {}
    for run_id in ORDER:
        art = RESULTS / f"{run_id}-r1.json"
        if not art.is_file():
            continue
        a = json.loads(art.read_text())
        steps = a["steps"] or 1
        per_step = a["train_time_s"] / steps
        reached = first_reaching(RESULTS / f"{run_id}-r1.metrics.jsonl", quality)
        test = a["metrics"]["test"]
        runs[run_id] = {
            "methods": a["methods"],
            "peak_rss_mib": a["memory"]["peak_rss_bytes"] / 2**20,
            "time_per_step_s": per_step,
            "steps": a["steps"],
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


def plot(summary: dict, out: Path) -> None:
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
    ax.set_ylabel("test accuracy after 200 steps")
    ax.set_title("seed004-memory: MiniLM-L6 / Rotten Tomatoes (CPU)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quality", type=float, default=0.70)
    args = ap.parse_args()
    summary = summarise(args.quality)
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, RESULTS / "memory_vs_quality.png")
    for run_id, r in summary["runs"].items():
        print(
            f"{run_id:<12} rss {r['peak_rss_mib']:7.0f} MiB  {r['time_per_step_s']:.2f} s/step  "
            f"to {args.quality}: {r['steps_to_quality']}  test acc {r['test_accuracy']:.3f}"
        )


if __name__ == "__main__":
    main()
