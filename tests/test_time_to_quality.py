"""Time to quality (issue 20 item 1): both frameworks write a validation curve with the training seconds
behind each point, and the comparison reads it right. No timing is asserted, only its bookkeeping."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from leantune.bench.time_to_quality import baseline_pairs, compare, first_reaching, workload_table

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


def test_a_lever_is_compared_with_its_baseline_as_with_hf(tmp_path):
    """--baseline: the baseline stands in for HF (target: its mean final validation; ratio: time to it
    over the baseline's whole run of the same seed); an explicit pair wins over the default."""
    folder = tmp_path / "levers"
    folder.mkdir()
    _fake(folder, "rt_lora.hf.s0", [(10, 0.6, 50.0), (20, 0.9, 100.0)], 0.85)
    _fake(folder, "rt_lora.base.s0", [(10, 0.8, 40.0), (20, 0.8, 80.0)], 0.82)
    _fake(folder, "rt_lora.base.s1", [(10, 0.7, 40.0), (20, 0.7, 60.0)], 0.76)  # base's target: 0.75
    _fake(folder, "rt_lora.bf16.s0", [(10, 0.8, 10.0), (20, 0.9, 20.0)], 0.80)
    _fake(folder, "rt_lora.bf16.s1", [(10, 0.74, 12.0), (20, 0.74, 24.0)], 0.80)  # never reaches 0.75
    _fake(folder, "rt_any.nocache.s0", [(10, 0.8, 30.0)], 0.7)
    _fake(folder, "rt_any.cache.s0", [(10, 0.8, 6.0)], 0.7)
    out = compare("levers", root=tmp_path, baselines=baseline_pairs(["base", "cache=nocache"]))
    arms = out["workloads"]["rt_lora"]["arms"]
    bf16 = arms["bf16"]["vs_baseline"]
    assert bf16["baseline"] == "base" and bf16["target"] == pytest.approx(0.75)
    assert bf16["reached_n"] == 1 and bf16["ratio_median"] == pytest.approx(10.0 / 80.0)
    assert bf16["ratio_to_crossing_median"] == pytest.approx(10.0 / 40.0)  # base crossed at 40 s
    assert bf16["whole_run_ratio_median"] == pytest.approx(statistics.median([20 / 80, 24 / 60]))
    assert bf16["test_delta_mean"] == pytest.approx(0.80 - (0.82 + 0.76) / 2)
    cache = arms["cache"]["vs_baseline"]
    assert cache["baseline"] == "nocache" and cache["ratio_median"] == pytest.approx(0.2)
    assert "vs_baseline" not in arms["hf"] and "vs_baseline" not in arms["base"]
    assert arms["bf16"]["ratio_median"] == pytest.approx(0.2)  # the HF comparison is untouched: 20 / 100


def test_first_reaching_and_no_reference():
    assert first_reaching([(1, 0.5, 1.0), (2, 0.7, 2.0), (3, 0.9, 3.0)], 0.7) == (2, 2.0)
    assert first_reaching([(1, 0.5, 1.0)], 0.7) is None
    with pytest.raises(KeyError):
        workload_table({"lt": {}}, "accuracy")  # no HF reference: nothing to compare with
    untimed = {"hf": {0: {"curve": []}, 1: {"curve": [(1, 0.5, 1.0)]}}}
    with pytest.raises(ValueError, match=r"arm 'hf': seeds \[0\] have no timed validation curve"):
        workload_table(untimed, "accuracy")


def test_a_reference_without_a_timed_curve_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    """HF runs from before `train_time_s` was logged: the CLI names the arm, the seeds and the fix."""
    from leantune.bench.time_to_quality import main

    folder = tmp_path / "benchmarks" / "results" / "old"
    folder.mkdir(parents=True)
    _fake(folder, "rt_lora.hf.s0", [(10, 0.8, 50.0)], 0.8)
    _fake(folder, "rt_lora.lt.s0", [(10, 0.8, 40.0)], 0.8)
    (folder / "rt_lora.hf.s0-r1.metrics.jsonl").write_text(
        json.dumps({"step": 10, "split": "validation"}) + "\n"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["old"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "time_to_quality: error: arm 'hf': seeds [0] have no timed validation curve: "
        "rerun them with train.eval_every"
    ]
    assert not (folder / "time_to_quality.json").exists()


def test_a_loss_is_reached_from_above(tmp_path):
    """SFT is scored by validation loss: the target is HF's mean final loss, reached at or below it."""
    folder = tmp_path / "sft"
    folder.mkdir()
    _fake(folder, "ni_lora.hf.s0", [(10, 2.0, 40.0), (20, 1.5, 80.0)], 1.6)
    _fake(folder, "ni_lora.lt.s0", [(10, 1.6, 20.0), (20, 1.4, 40.0)], 1.5)
    for run in folder.glob("*.metrics.jsonl"):  # the fake curve is written as accuracy: relabel it
        run.write_text(run.read_text().replace('"accuracy"', '"loss"'))
    for art in folder.glob("*-r1.json"):
        art.write_text(art.read_text().replace('"accuracy"', '"loss"'))
    out = compare("sft", metric="loss", root=tmp_path)
    lt = out["workloads"]["ni_lora"]["arms"]["lt"]
    assert out["goal_ratio"] == 0.7 and out["workloads"]["ni_lora"]["target"] == 1.5
    assert lt["seeds"][0]["step_reached"] == 20 and lt["seeds"][0]["ratio"] == pytest.approx(0.5)
    assert lt["quality_not_lower"] is True  # test loss 1.5 below HF's 1.6


@pytest.mark.parametrize("methods", ["[full]", "[lora]"])
def test_hf_baseline_runs_sft_with_a_falling_loss_curve(tiny_models, tmp_path, methods):
    """The baseline's causal-LM SFT: prompt tokens masked (-100) and padded alike, peft's CAUSAL_LM task
    for LoRA, the curve scored by validation loss with leantune's evaluation."""
    from leantune.bench.hf_baseline import main as hf_main

    rows = [
        {"text": f"question {i % 7}", "label": f"answer {i % 7} is {'yes' if i % 2 else 'no'}"}
        for i in range(120)
    ]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    argv = [
        "task=causal_lm",
        f"model.name={tiny_models['llama']}",
        "model.max_length=32",
        f"data.source={data}",
    ]
    argv += ["data.label_column=label", "train.batch_size=8", "train.epochs=2", "train.eval_every=4"]
    argv += [f"methods={methods}", "train.lr=1e-2" if methods == "[lora]" else "train.lr=1e-3"]
    argv += ["train.num_threads=1", "train.save_every=null", "output.tensorboard=false", f"output.dir={out}"]
    assert hf_main(argv) == 0
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    curve = [r["loss"] for r in map(json.loads, lines) if r.get("split") == "validation"]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["train"]["metric"] == "loss" and len(curve) >= 3
    # a random tiny Llama: full tuning falls ~0.6 nats in 30 steps, LoRA ~0.07 (deterministic, seeded)
    assert curve[-1] < curve[0] - (0.3 if methods == "[full]" else 0.04)
    if methods == "[lora]":
        adapter = json.loads((out / "model" / "adapter_config.json").read_text(encoding="utf-8"))
        assert adapter["task_type"] == "CAUSAL_LM"


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["data.packing=true"], "data.packing=false"),
        (["eval.generate=true"], "eval.generate=false"),
        (["task=seq2seq"], "supports tasks"),
    ],
)
def test_hf_baseline_refuses_what_it_does_not_run_in_one_line(tiny_models, tmp_path, capsys, extra, words):
    """Before any model loads: exit 2, one line on stderr naming the fix; no run folder."""
    from leantune.bench.hf_baseline import main as hf_main

    out = tmp_path / "run"
    argv = ["task=causal_lm", f"model.name={tiny_models['llama']}", "data.label_column=label", *extra]
    assert hf_main([*argv, f"output.dir={out}"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and words in err[0] and "Traceback" not in err[0]
    assert not out.exists()
