"""Time to quality (issue 20 item 1): both frameworks write a validation curve with the training seconds
behind each point, and the comparison reads it right. No timing is asserted, only its bookkeeping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leantune.bench.time_to_quality import compare, first_reaching, workload_table

STEPS_EVALUATED = [3, 4, 6, 8]  # eval_every 3 over 2 epochs of 4 steps: 3 and 6, and the epoch ends 4 and 8


def _curve_run(overrides: list[str], out: Path, hf: bool) -> tuple[list[dict], dict]:
    from leantune.bench.hf_baseline import main as hf_main
    from leantune.cli import main

    argv = [*overrides, "data.max_train_samples=64", "train.epochs=2", "train.eval_every=3"]
    argv += ["train.save_every=null", "train.adamw_impl=fused", f"output.dir={out}"]
    assert (hf_main(argv) if hf else main(["train", *argv])) == 0
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [r for r in map(json.loads, lines) if r.get("split") == "validation"]
    return records, json.loads((out / "summary.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("hf", [False, True], ids=["leantune", "hf_baseline"])
def test_both_frameworks_log_a_timed_validation_curve(base_overrides, tmp_path, hf):
    records, summary = _curve_run(base_overrides, tmp_path / "run", hf)
    assert [r["step"] for r in records] == STEPS_EVALUATED  # the same points on both sides
    times = [r["train_time_s"] for r in records]
    assert all(b > a for a, b in zip(times, times[1:], strict=False)) and times[0] > 0
    train = summary["train"]
    assert times[-1] <= train["train_time_s"] + 1e-6  # evaluation is not training time
    if hf:  # the curve's evaluations were taken out of the Trainer's runtime and counted as evaluation
        assert train["train_time_s"] + train["eval_time_s"] <= summary["wall_time_s"]
        assert summary["baseline"]["optim"] == "adamw_torch_fused"  # train.adamw_impl=fused reached it
    # the last point scored the final weights in eval mode: it equals the run's final validation
    assert records[-1]["accuracy"] == pytest.approx(summary["validation"]["accuracy"])


def _fake(folder: Path, run_id: str, curve: list[tuple[int, float, float]], test: float, **extra) -> None:
    artefact = {
        "train_time_s": curve[-1][2],
        "metrics": {"test": {"accuracy": test}},
        "config": {"train": {"lr": 1e-3}},
        "methods": ["lora"],
        "machine": {"load_avg_1m_5m_15m": [0.5, 0.5, 0.5]},
        **extra,
    }
    (folder / f"{run_id}-r1.json").write_text(json.dumps(artefact))
    rows = [{"step": s, "split": "validation", "accuracy": v, "train_time_s": t} for s, v, t in curve]
    (folder / f"{run_id}-r1.metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_ratio_is_time_to_hf_mean_final_over_hf_whole_run(tmp_path):
    folder = tmp_path / "ttq"
    folder.mkdir()
    # HF ends at 0.80 and 0.70 (target 0.75) after 100 and 120 s
    _fake(folder, "rt_lora.hf.s0", [(10, 0.6, 50.0), (20, 0.8, 100.0)], 0.81)
    _fake(folder, "rt_lora.hf.s1", [(10, 0.76, 60.0), (20, 0.7, 120.0)], 0.71)
    # leantune reaches 0.75 at 30 s (seed 0) and 30 s + a 6 s range test (seed 1)
    _fake(folder, "rt_lora.lt.s0", [(5, 0.5, 10.0), (10, 0.75, 30.0), (20, 0.9, 80.0)], 0.85)
    range_test = {"lr": 2e-3, "time_s": 6.0}
    _fake(folder, "rt_lora.lt.s1", [(10, 0.74, 30.0), (15, 0.78, 30.0)], 0.6, lr_auto=range_test)
    # a run that picks its own method joins every workload of its dataset; this one never gets there
    _fake(folder, "rt_any.auto.s0", [(10, 0.7, 20.0)], 0.65)
    _fake(folder, "unrelated-r1", [(1, 0.1, 1.0)], 0.1)  # an id without the naming scheme is ignored
    out = compare("ttq", root=tmp_path)
    table = out["workloads"]["rt_lora"]
    assert list(out["workloads"]) == ["rt_lora"]
    assert table["target"] == pytest.approx(0.75)
    lt = table["arms"]["lt"]
    assert lt["seeds"][0]["ratio"] == pytest.approx(30.0 / 100.0)
    assert lt["seeds"][1]["time_to_target_s"] == pytest.approx(36.0)  # the range test counts
    assert lt["seeds"][1]["ratio"] == pytest.approx(36.0 / 120.0)
    assert lt["ratio_median"] == pytest.approx(0.3) and lt["reached"] == "2/2"
    assert table["arms"]["hf"]["seeds"][1]["ratio"] == pytest.approx(0.5)  # HF's own first crossing
    auto = table["arms"]["auto"]
    assert auto["reached"] == "0/1" and auto["ratio_median"] is None
    # quality: HF 0.76 +- 0.0707; lt mean 0.725 is within HF's spread, auto's 0.65 is not
    assert lt["quality_not_lower"] is True and auto["quality_not_lower"] is False


def test_first_reaching_and_no_reference():
    assert first_reaching([(1, 0.5, 1.0), (2, 0.7, 2.0), (3, 0.9, 3.0)], 0.7) == (2, 2.0)
    assert first_reaching([(1, 0.5, 1.0)], 0.7) is None
    with pytest.raises(KeyError):
        workload_table({"lt": {}}, "accuracy")  # no HF reference: nothing to compare with
