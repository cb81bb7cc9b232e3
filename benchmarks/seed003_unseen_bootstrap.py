"""The unseen-task suites' per-row spread: a paired bootstrap of ROUGE-L and exact match over the test rows.

The suites score only 100-200 unseen-task rows per run, so a difference of a few points may be chance.
Every run generates for the same rows (the test split is fixed by NI_UNSEEN and data.split_seed), so the
bootstrap resamples row indices once and applies them to every run: the paired difference "unified minus
X" then cancels the rows' own difficulty. Per-row scores come from leantune's own `text_metrics` on one
row at a time, so their means equal the run's reported ROUGE-L and exact match.

A method may run at several rates (`<method>_lr<rate>`, seed003-unseen-200): its row is the rate with
the lowest validation loss, which is measured on *seen* subtasks, so the unseen test never picks it.

    # 1. after `leantune bench SUITE --work /tmp/SUITE`: keep each run's predictions
    PYTHONPATH=src python benchmarks/seed003_unseen_bootstrap.py collect --suite SUITE --work /tmp/SUITE
    # 2. from the committed predictions: the spread
    PYTHONPATH=src python benchmarks/seed003_unseen_bootstrap.py --suite SUITE
    -> benchmarks/results/SUITE/<run>.predictions.jsonl (collect), bootstrap.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
ORDER = ("base", "full", "lora", "adapters", "freeze", "unified")
REFERENCE = "unified"
RESAMPLES = 2000
METRICS = ("rougeL", "exact_match")


def method_of(run_id: str) -> str:
    return run_id.split("_lr", 1)[0]


def collect(work: Path, results: Path) -> None:
    """Each run's test predictions (reference, prediction, held-out category) without the long prompts."""
    from leantune.atomic import write_text_atomic
    from leantune.data.builtin.bigbench import natural_instructions_unseen

    category = {r["text"]: r["category"] for r in natural_instructions_unseen()["test"]}
    for source in sorted(work.glob("*-r1/predictions.jsonl")):
        run_id = source.parent.name.removesuffix("-r1")
        if method_of(run_id) not in ORDER:
            continue
        rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines()]
        kept = [
            {"category": category[r["source"]], "reference": r["reference"], "prediction": r["prediction"]}
            for r in rows
        ]
        write_text_atomic(
            results / f"{run_id}.predictions.jsonl",
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


def _validation_loss(results: Path, run_id: str) -> float:
    artefact = json.loads((results / f"{run_id}-r1.json").read_text(encoding="utf-8"))
    return float(artefact["metrics"]["validation"]["loss"])


def _run_ids(results: Path) -> list[str]:
    return sorted(p.name.removesuffix(".predictions.jsonl") for p in results.glob("*.predictions.jsonl"))


def choose(results: Path) -> dict[str, dict]:
    """Per method, in ORDER: its runs' validation losses and the run with the lowest (ties: first)."""
    run_ids = _run_ids(results)
    chosen: dict[str, dict] = {}
    for method in ORDER:
        losses = {r: _validation_loss(results, r) for r in run_ids if method_of(r) == method}
        if losses:
            chosen[method] = {"run": min(losses, key=losses.__getitem__), "validation_loss": losses}
    return chosen


def _entry(scores: dict, categories: list[str], reference: dict | None, draws: list[list[int]]) -> dict:
    """Mean, interval and per-category mean of each metric; with `reference`, the paired difference."""
    entry: dict = {}
    for m in METRICS:
        values = scores[m]
        boot = [_mean([values[i] for i in d]) for d in draws]
        entry[m] = {"mean": _mean(values), "ci95": _interval(boot)}
        for cat in sorted(set(categories)):
            entry[m][cat] = _mean([v for v, c in zip(values, categories, strict=True) if c == cat])
        if reference is not None:
            diff = [a - b for a, b in zip(reference[m], values, strict=True)]
            boot_diff = [_mean([diff[i] for i in d]) for d in draws]
            entry[m][f"{REFERENCE}_minus"] = {
                "mean": _mean(diff),
                "ci95": _interval(boot_diff),
                "share_above_zero": sum(b > 0 for b in boot_diff) / RESAMPLES,
            }
    return entry


def summarise(results: Path) -> dict:
    """`runs`: each method's chosen run against unified's; `every_run` (when a method ran at several
    rates): every run against unified's chosen one, so the rates the validation set passed over show too."""
    chosen = choose(results)
    scored = {c: row_scores(results / f"{c}.predictions.jsonl") for c in _run_ids(results)}
    categories = next(iter(scored.values()))[0]
    if any(cats != categories for cats, _ in scored.values()):
        raise SystemExit("the runs did not score the same test rows in the same order")
    n = len(categories)
    rng = random.Random(0)
    draws = [[rng.randrange(n) for _ in range(n)] for _ in range(RESAMPLES)]
    reference = scored[chosen[REFERENCE]["run"]][1] if REFERENCE in chosen else None
    out: dict = {"rows": n, "resamples": RESAMPLES, "interval": "2.5-97.5 percentile", "chosen": chosen}
    out["runs"] = {
        method: _entry(scored[c["run"]][1], categories, None if method == REFERENCE else reference, draws)
        for method, c in chosen.items()
    }
    if len(scored) > len(chosen):
        out["every_run"] = {
            run_id: _entry(scores, categories, reference, draws) for run_id, (_, scores) in scored.items()
        }
    out["category_rows"] = {c: categories.count(c) for c in sorted(set(categories))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("step", nargs="?", choices=["collect", "summarise"], default="summarise")
    parser.add_argument("--suite", default="seed003-unseen")
    parser.add_argument("--work", type=Path, help="the bench's --work folder (default: /tmp/SUITE)")
    args = parser.parse_args()
    results = RESULTS_ROOT / args.suite
    if args.step == "collect":
        collect(args.work or Path("/tmp") / args.suite, results)
        return
    from leantune.atomic import write_json_atomic

    write_json_atomic(results / "bootstrap.json", summarise(results))


if __name__ == "__main__":
    main()
