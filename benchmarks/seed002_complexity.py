"""Seed 002's task-complexity study (issue 19 item 2): which probe signal orders tasks by difficulty?

    python benchmarks/data/make_keyword.py && python benchmarks/data/prepare_trec.py
    leantune bench seed002-complexity            # reference LoRA r8 runs for keyword and VitaminC
    python benchmarks/seed002_complexity.py      # -> benchmarks/results/seed002-complexity/measures.json

For each of four tasks (synthetic keyword, Rotten Tomatoes, TREC-6, VitaminC) and three probe seeds, it
builds exactly what dynamic_rank probes when training starts (the embedded MiniLM-L6 with rank-1 LoRA on
query/value, `probe_batches` = 4 batches of 32) and records every candidate of
`leantune.methods._complexity` plus seed 002's signal. The seed changes the head and LoRA initialisation
(train.seed) and which batches are probed (offset 4 x seed). Difficulty = 1 - (accuracy - majority) /
(1 - majority) of a fixed LoRA r8 run (one seed) on the test split; the script reports, per candidate,
the Spearman correlation of its seed mean with that difficulty (4 points: weak evidence at best) and the
rank cap max_rank x (1/4 + 3/4 c) it would give each task at max_rank 16. Written here, not in leantune,
because it is one study's bookkeeping.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "seed002-complexity"
OLD = ROOT / "results" / "seed002-dynamic-rank"
COMMON = [
    "model.name=embedded:minilm",
    "data.max_train_samples=2000",
    "data.max_eval_samples=300",
    "train.batch_size=32",
    "train.num_threads=1",
    "methods=[{name: dynamic_rank}]",
    "output.tensorboard=false",
    "output.overwrite=true",
]
DATASETS = {
    "keyword": (["data.source=benchmarks/data/keyword.csv"], OUT / "keyword_lora_r8-r1.json"),
    "rt": (["data.source=builtin:rotten_tomatoes"], OLD / "rt_lora_r8-r1.json"),
    "trec": (["data.source=benchmarks/data/trec.csv"], OLD / "trec_lora_r8-r1.json"),
    "vitaminc": (
        ["data.source=builtin:vitaminc", "data.text_pair_column=text_pair"],
        OUT / "vitaminc_lora_r8-r1.json",
    ),
}
SEEDS = (0, 1, 2)
MAX_RANK = 16  # dynamic_rank's default max_rank


def reference(path: Path) -> dict:
    """Test accuracy, majority and difficulty of the fixed LoRA r8 run, and its threads."""
    art = json.loads(path.read_text())
    test = art["metrics"]["test"]
    acc, maj = test["accuracy"], test["majority_accuracy"]
    return {
        "artefact": str(path.relative_to(ROOT.parent)),
        "accuracy": acc,
        "majority_accuracy": maj,
        "difficulty": 1 - (acc - maj) / (1 - maj),
        "threads": art["config"]["train"]["num_threads"],
    }


def probe(name: str, seed: int) -> dict:
    from leantune.config import load_config
    from leantune.methods.dynamic_rank import complexity_of, score_layers
    from leantune.recipes.train import prepare

    extra, _ = DATASETS[name]
    cfg = load_config(
        None, [*COMMON, *extra, f"train.seed={seed}", f"output.dir=/tmp/seed002-complexity/{name}-{seed}"]
    )
    prep = prepare(cfg)
    method = cfg.methods[0]
    _, loss = score_layers(
        prep.model, method, prep.data["train"], 32, prep.tokenizer.pad_token_id, offset=4 * seed
    )
    out = complexity_of(prep.data["train"], len(cfg.data.label_names or []), loss, 32)
    return {k: v for k, v in out.items() if isinstance(v, float)} | {"falls": list(loss.falls or [])}


def summarise(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


SELECTION_RULE = (
    "among the [0, 1] mappings (cx_*) whose four task means spread (sd) at least 2x their mean seed sd"
    " (below that the order is seed noise), the highest Spearman vs difficulty; ties: the larger ratio"
)
MIN_SEPARATION = 2.0


def separation(per: dict[str, dict], m: str) -> float:
    """Sd of the four task means over the mean seed sd: how far the tasks stand apart in seed noise."""
    means = [per[n]["measures"][m]["mean"] for n in per]
    noise = statistics.fmean(per[n]["measures"][m]["std"] for n in per)
    return statistics.stdev(means) / max(noise, 1e-12)


def select(per: dict[str, dict], spearman: dict[str, float]) -> str | None:
    """The candidate SELECTION_RULE picks (its name without the cx_ prefix); None: none separates."""
    cands = [m for m in spearman if m.startswith("cx_") and separation(per, m) >= MIN_SEPARATION]
    if not cands:
        return None
    return max(cands, key=lambda m: (round(spearman[m], 9), separation(per, m))).removeprefix("cx_")


def main() -> Path:
    from scipy.stats import spearmanr

    from leantune.atomic import write_json_atomic
    from leantune.methods._complexity import COMPLEXITY_SIGNAL
    from leantune.methods.dynamic_rank import rank_cap
    from leantune.recipes.common import machine, versions

    t0, cpu0 = time.perf_counter(), time.process_time()
    load_before = os.getloadavg()[0]
    per: dict[str, dict] = {}
    for name, (_, ref) in DATASETS.items():
        runs = []
        for seed in SEEDS:
            runs.append(probe(name, seed))
            shown = {k: round(v, 4) for k, v in runs[-1].items() if isinstance(v, float)}
            print(name, seed, shown, flush=True)
        keys = [k for k in runs[0] if k != "falls"]
        per[name] = {
            "reference": reference(ref),
            "measures": {k: summarise([r[k] for r in runs]) for k in keys},
            "falls": [r["falls"] for r in runs],
        }
    difficulty = [per[n]["reference"]["difficulty"] for n in DATASETS]
    measures = list(per["rt"]["measures"])
    spearman = {}
    for m in measures:
        rho = spearmanr([per[n]["measures"][m]["mean"] for n in DATASETS], difficulty).statistic
        spearman[m] = float(rho)
    chosen = select(per, spearman)
    caps = {
        m: {n: rank_cap(MAX_RANK, per[n]["measures"][m]["mean"]) for n in DATASETS}
        for m in measures
        if m.startswith("cx_") or m == "complexity_seed002"
    }
    result = {
        "suite": "seed002-complexity",
        "command": "python benchmarks/seed002_complexity.py",
        "config": {"overrides": COMMON, "datasets": {n: d[0] for n, d in DATASETS.items()}},
        "seeds": list(SEEDS),
        "probe": "4 batches of 32 from offset 4 x seed; train.seed = seed; loss-fall: Adam lr 1e-2, 4 steps",
        "difficulty_rule": "1 - (test accuracy - majority) / (1 - majority) of LoRA r8 q/v, one seed",
        "order_by_difficulty": sorted(DATASETS, key=lambda n: per[n]["reference"]["difficulty"]),
        "datasets": per,
        "spearman_vs_difficulty": spearman,
        "rank_cap_at_max_rank_16": caps,
        "selection_rule": SELECTION_RULE,
        "separation": {m: separation(per, m) for m in measures if m.startswith("cx_")},
        "selected_by_rule": chosen,
        "kept_in_code": COMPLEXITY_SIGNAL,
        "versions": versions(),
        "machine": machine(),
        "load_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - cpu0,
        "note": "2-core machine shared by ~6 engineers; nice -n 5, 1 torch thread",
    }
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "measures.json"
    write_json_atomic(path, result)
    return path


if __name__ == "__main__":
    sys.exit(print(main()))
