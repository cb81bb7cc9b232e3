"""leantune.bench.sweep: the rate is chosen on the sweep seed's validation metric (never test), the
other seeds are asked for only at that rate, and the figures over seeds are the right means and spreads."""

from __future__ import annotations

import statistics

import pytest

from leantune.bench.sweep import choose, group_of, next_runs, summarise


def _artefact(run_id: str, lr: float, seed: int, val: float, test: float, time_s: float = 10.0) -> dict:
    return {
        "run_id": run_id,
        "seed": seed,
        "config": {"train": {"lr": lr}},
        "methods": [run_id.split("_")[1]],
        "metrics": {
            "validation": {"accuracy": val},
            "test": {"accuracy": test, "macro_f1": test - 0.01, "majority_accuracy": 0.5},
        },
        "train_time_s": time_s,
        "peak_memory_bytes": 2**30,
        "params": {"trainable": 10, "trainable_pct": 1.0},
        "cpu_utilisation": 1.5,
        "machine": {"device": "cpu"},
    }


ARTS = [
    _artefact("rt_full_lr1e-4_s0", 1e-4, 0, val=0.70, test=0.99, time_s=20.0),  # best test, worse val
    _artefact("rt_full_lr5e-5_s0", 5e-5, 0, val=0.80, test=0.78, time_s=20.0),
    _artefact("rt_full_lr5e-5_s1", 5e-5, 1, val=0.79, test=0.80, time_s=30.0),
    _artefact("rt_lora_lr1e-3_s0", 1e-3, 0, val=0.75, test=0.74, time_s=10.0),
    _artefact("rt_lora_lr1e-3_s1", 1e-3, 1, val=0.75, test=0.76, time_s=12.0),
    _artefact("rt_lora_lr3e-3_s0", 3e-3, 0, val=0.51, test=0.51),
    _artefact("rt_lora_lr3e-3_s1", 3e-3, 1, val=0.51, test=0.51),  # not the chosen rate: left out
]


def test_ids_parse_into_groups():
    assert group_of("trec_houlsby_lr3e-4_s2") == "trec_houlsby"
    assert group_of("rt_full") is None


def test_the_rate_is_chosen_on_validation_not_test():
    full = [a for a in ARTS if a["run_id"].startswith("rt_full")]
    assert choose(full) == 5e-5


def test_next_runs_asks_only_for_the_chosen_rate():
    suite = [f"rt_{m}_lr{lr}_s{s}" for m, lr in (("full", "5e-5"), ("full", "1e-4")) for s in (0, 1, 2)]
    suite += [f"rt_lora_lr{lr}_s{s}" for lr in ("1e-3", "3e-3") for s in (0, 1, 2)]
    assert next_runs(suite, ARTS, [0, 1, 2]) == ["rt_full_lr5e-5_s2", "rt_lora_lr1e-3_s2"]


def test_summary_means_spreads_and_time_paired_by_seed():
    out = summarise(ARTS)
    lora = out["rt_lora"]
    assert lora["lr"] == 1e-3 and lora["seeds"] == [0, 1]
    assert lora["test"]["accuracy"]["mean"] == pytest.approx(0.75)
    assert lora["test"]["accuracy"]["std"] == pytest.approx(statistics.stdev([0.74, 0.76]))
    assert lora["sweep"] == {"0.001": 0.75, "0.003": 0.51}
    # seed 0: 10/20, seed 1: 12/30
    assert lora["time_vs_full"]["mean"] == pytest.approx((0.5 + 0.4) / 2)
    assert not lora["at_majority"]
    assert out["rt_full"]["time_vs_full"]["mean"] == pytest.approx(1.0)


def test_a_group_at_the_majority_class_is_flagged():
    arts = [_artefact("rt_ia3_lr1e-3_s0", 1e-3, 0, val=0.5, test=0.51)]
    assert summarise(arts)["rt_ia3"]["at_majority"]
