"""Training-step time of freeze-k with the frozen-prefix cache against recomputing the prefix, measured
interleaved (computed, served, computed, served, ...) on the same batches, so that a shared machine's
changing load hits both alike; the epoch times of the `prefix-cache` suite cannot separate the two.

    PYTHONPATH=src python benchmarks/prefix_cache_interleaved.py --layers 4 --pairs 6
    -> benchmarks/results/prefix-cache/interleaved-freeze4.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import leantune.train.prefix_cache as prefix_cache
from leantune.config import load_config
from leantune.data.tasks import collate
from leantune.recipes.common import machine, versions
from leantune.recipes.train import prepare


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    overrides = [
        "model.name=embedded:minilm",
        "data.source=builtin:rotten_tomatoes",
        f"methods=[{{name: freeze, layers: {args.layers}}}]",
        "train.cache_frozen_prefix=true",
        f"train.num_threads={args.threads}",
        "output.dir=/tmp/leantune-prefix-cache-interleaved",  # prepare() checks it, nothing is written
        "output.overwrite=true",
    ]
    prep = prepare(load_config(None, overrides))
    model, train = prep.model, prep.data["train"]
    model.train()
    cache = prefix_cache.PrefixCache(model)
    times: dict[str, list[float]] = {"computed": [], "served": []}
    for p in range(args.pairs):
        idx = list(range(p * args.batch_size, (p + 1) * args.batch_size))
        batch = collate([train[i] for i in idx], prep.tokenizer.pad_token_id)
        for mode in ("first", "computed", "served"):  # "first" fills the cache (untimed)
            prefix_cache.SERVE_FROM_CACHE = mode == "served"
            t0 = time.perf_counter()
            with cache.micro_batch(idx, batch["attention_mask"]):
                model(**batch).loss.backward()
            if mode != "first":
                times[mode].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    ratios = [c / s for c, s in zip(times["computed"], times["served"], strict=True)]
    result = {
        "what": f"fwd+bwd of one micro-batch, freeze-{args.layers}, MiniLM-L6, Rotten Tomatoes snippets",
        "command": f"benchmarks/prefix_cache_interleaved.py --layers {args.layers} --pairs {args.pairs}",
        "batch_size": args.batch_size,
        "threads": args.threads,
        "step_s": times,
        "speedup_per_pair": ratios,
        "speedup_median": statistics.median(ratios),
        "prefix_cache": cache.report(),
        "versions": versions(),
        "machine": machine(),
    }
    out = Path("benchmarks/results/prefix-cache") / f"interleaved-freeze{args.layers}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"median speed-up {result['speedup_median']:.2f}x over {args.pairs} pairs -> {out}")


if __name__ == "__main__":
    main()
