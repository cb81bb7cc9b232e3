"""seed003-unseen's per-row spread: a paired bootstrap of ROUGE-L and exact match over the test rows.

The suite scores only 100 unseen-task rows per run, so a difference of a few points may be chance. Every
run generates for the same rows (the test split is fixed by NI_UNSEEN and data.split_seed), so the
bootstrap resamples row indices once and applies them to every run: the paired difference "unified minus
X" then cancels the rows' own difficulty. Per-row scores come from leantune's own `text_metrics` on one
row at a time, so their means equal the run's reported ROUGE-L and exact match.

    # 1. after `leantune bench seed003-unseen --work /tmp/seed003-unseen`: keep each run's predictions
    PYTHONPATH=src python benchmarks/seed003_unseen_bootstrap.py collect --work /tmp/seed003-unseen
    # 2. from the committed predictions: the spread
    PYTHONPATH=src python benchmarks/seed003_unseen_bootstrap.py
    -> benchmarks/results/seed003-unseen/<run>.predictions.jsonl (collect), bootstrap.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "seed003-unseen"
ORDER = ("base", "full", "lora", "adapters", "freeze", "unified")
REFERENCE = "unified"
RESAMPLES = 2000
METRICS = ("rougeL", "exact_match")


def collect(work: Path) -> None:
    """Each run's test predictions (reference, prediction, held-out category) without the long prompts."""
    from leantune.atomic import write_text_atomic
    from leantune.data.builtin.bigbench import natural_instructions_unseen

    category = {r["text"]: r["category"] for r in natural_instructions_unseen()["test"]}
    for run_id in ORDER:
        source = work / f"{run_id}-r1" / "predictions.jsonl"
        if not source.is_file():
            continue
        rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines()]
        kept = [
            {"category": category[r["source"]], "reference": r["reference"], "prediction": r["prediction"]}
            for r in rows
        ]
        write_text_atomic(
            RESULTS / f"{run_id}.predictions.jsonl",
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept),
        )


def row_scores(path: Path) -> tuple[list[str], dict[str, list[float]]]:
    from leantune.eval.generation import text_metrics

    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    scores = {m: [] for m in METRICS}
    for r in rows:
        one = text_metrics([r["prediction"]], [r["reference"]])
        for m in METRICS:
            scores[m].append(one[m])
    return [r["category"] for r in rows], scores


def _interval(values: list[float]) -> list[float]:
    ordered = sorted(values)
    return [ordered[int(0.025 * len(ordered))], ordered[int(0.975 * len(ordered)) - 1]]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarise() -> dict:
    present = [r for r in ORDER if (RESULTS / f"{r}.predictions.jsonl").is_file()]
    runs = {r: row_scores(RESULTS / f"{r}.predictions.jsonl") for r in present}
    categories = next(iter(runs.values()))[0]
    n = len(categories)
    if any(cats != categories for cats, _ in runs.values()):
        raise SystemExit("the runs did not score the same test rows in the same order")
    rng = random.Random(0)
    draws = [[rng.randrange(n) for _ in range(n)] for _ in range(RESAMPLES)]
    out: dict = {"rows": n, "resamples": RESAMPLES, "interval": "2.5-97.5 percentile", "runs": {}}
    for run_id, (_, scores) in runs.items():
        entry: dict = {}
        for m in METRICS:
            values = scores[m]
            boot = [_mean([values[i] for i in d]) for d in draws]
            entry[m] = {"mean": _mean(values), "ci95": _interval(boot)}
            for cat in sorted(set(categories)):
                picked = [v for v, c in zip(values, categories, strict=True) if c == cat]
                entry[m][cat] = _mean(picked)
            if run_id != REFERENCE and REFERENCE in runs:
                ref = runs[REFERENCE][1][m]
                diff = [a - b for a, b in zip(ref, values, strict=True)]
                boot_diff = [_mean([diff[i] for i in d]) for d in draws]
                entry[m][f"{REFERENCE}_minus"] = {
                    "mean": _mean(diff),
                    "ci95": _interval(boot_diff),
                    "share_above_zero": sum(b > 0 for b in boot_diff) / RESAMPLES,
                }
        out["runs"][run_id] = entry
    out["category_rows"] = {c: categories.count(c) for c in sorted(set(categories))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("step", nargs="?", choices=["collect", "summarise"], default="summarise")
    parser.add_argument("--work", type=Path, default=Path("/tmp/seed003-unseen"))
    args = parser.parse_args()
    if args.step == "collect":
        collect(args.work)
        return
    from leantune.atomic import write_json_atomic

    write_json_atomic(RESULTS / "bootstrap.json", summarise())


if __name__ == "__main__":
    main()
