"""`methods: auto` / `leantune plan --auto` (recipes/auto.py): the pick follows the memory model and the
time model, fits its budget, is recorded in summary.json and the run log, and --resume reuses it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from leantune.config import load_config
from leantune.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _overrides(tiny_models, sentiment_csv, tmp_path, budget: str, epochs: int = 1) -> list[str]:
    return [
        f"model.name={tiny_models['bert']}",
        "model.max_length=16",
        f"data.source={sentiment_csv}",
        "train.batch_size=16",
        f"train.epochs={epochs}",
        "train.num_threads=1",
        "train.save_every=10",
        "output.tensorboard=false",
        f"output.dir={tmp_path / 'run'}",
        f"methods=[{{name: auto, budget: '{budget}'}}]",
    ]


def _resolve(overrides: list[str]) -> dict:
    from leantune.recipes.auto import resolve

    return resolve(load_config(None, overrides))[1]


def _estimate(cfg_overrides: list[str], record: dict) -> int:
    """The memory model's total for the resolved config, computed independently of the planner."""
    from leantune.memory.estimate import estimate_memory
    from leantune.methods import MethodContext, apply_methods
    from leantune.recipes.auto import apply_choice
    from leantune.recipes.plan import _load_base

    cfg = apply_choice(load_config(None, cfg_overrides), record)
    _, data, model = _load_base(cfg, "x")
    model = apply_methods(model, cfg.methods, MethodContext(task=cfg.task, seed=cfg.train.seed))
    seq = min(max(len(r["input_ids"]) for r in data["train"]), cfg.model.max_length)
    return estimate_memory(model, cfg.task, cfg.train.batch_size, seq, "adamw").total_bytes


def test_generous_budget_picks_full_and_tight_budget_a_peft_method_that_fits(
    tiny_models, sentiment_csv, tmp_path
):
    generous = _overrides(tiny_models, sentiment_csv, tmp_path, "4GiB")
    record = _resolve(generous)
    rows = {c["id"]: c for c in record["candidates"]}
    assert record["chosen"] == "full" and record["methods"] == [{"name": "full"}]
    assert all(c["fits"] for c in rows.values())
    assert rows["full"]["memory_bytes"] == _estimate(generous, record) <= record["budget_bytes"]

    # one byte below what full fine-tuning needs per the memory model: full must not be picked
    tight_budget = rows["full"]["memory_bytes"] - 1
    tight = _overrides(tiny_models, sentiment_csv, tmp_path, str(tight_budget))
    small = _resolve(tight)
    assert small["budget_bytes"] == tight_budget
    assert small["chosen"] != "full" and {m["name"] for m in small["methods"]} <= {"lora", "freeze"}
    picked = next(c for c in small["candidates"] if c["id"] == small["chosen"])
    assert picked["fits"] and picked["memory_bytes"] <= tight_budget
    # the pick needs more steps than full: the run is lengthened to them, and with a frozen prefix the
    # epochs after the first read the cache (whose RAM is then part of the estimate)
    assert picked["steps_multiplier"] > 1
    assert small["train"]["epochs"] == math.ceil(picked["steps_multiplier"])
    assert small["train"]["cache_frozen_prefix"] == (picked["frozen_blocks"] > 0)
    model_only = _estimate(tight, small)
    assert model_only <= picked["memory_bytes"] <= tight_budget
    if not small["train"]["cache_frozen_prefix"]:
        assert model_only == picked["memory_bytes"]
    fitting = [c for c in small["candidates"] if c["fits"]]
    assert picked["expected"] <= min(c["expected"] for c in fitting) * 1.15


def test_more_epochs_make_the_cached_frozen_prefix_win(tiny_models, sentiment_csv, tmp_path):
    """3 epochs: epochs 2-3 skip the frozen blocks' forward, enough to beat full on the time model."""
    record = _resolve(_overrides(tiny_models, sentiment_csv, tmp_path, "4GiB", epochs=3))
    picked = next(c for c in record["candidates"] if c["id"] == record["chosen"])
    full = next(c for c in record["candidates"] if c["id"] == "full")
    assert picked["frozen_blocks"] > 0 and record["train"]["cache_frozen_prefix"] is True
    assert record["train"]["epochs"] == math.ceil(3 * picked["steps_multiplier"])
    assert picked["flops_later"] < picked["flops_first_epoch"]
    assert picked["expected"] * 1.15 < full["expected"]  # outside the tie band: speed decided


def test_extend_false_keeps_the_run_length(tiny_models, sentiment_csv, tmp_path):
    overrides = _overrides(tiny_models, sentiment_csv, tmp_path, "4GiB", epochs=3)
    overrides[-1] = "methods=[{name: auto, budget: 4GiB, extend: false}]"
    record = _resolve(overrides)
    assert record["chosen"] != "full" and "epochs" not in record["train"]
    assert not any(line.startswith("train.epochs") for line in record["reasons"])


def test_time_to_quality_counts_the_cache_only_after_the_first_epoch():
    from leantune.recipes.auto import Candidate, time_to_quality

    c = Candidate("x", "freeze", [], {}, 0, 2.0, flops_first_epoch=6.0, flops_later=3.0)
    # 2 x 10 steps needed, 5 per epoch: 5 at 6 FLOPs, 15 at 3, over 10 full steps of 6
    assert time_to_quality(c, 6.0, per_epoch=5, steps=10) == pytest.approx((5 * 6 + 15 * 3) / 60)
    assert time_to_quality(c, 6.0, per_epoch=100, steps=10) == pytest.approx(2.0)


def test_constants_are_what_the_committed_artefacts_measured():
    """recipes/auto.py's step multipliers and LoRA step overhead equal what bench/time_to_target.py reads
    off the artefacts (seed003-unified curves, seed000-table2-core times), and evidence.json is current."""
    from leantune.bench.time_to_target import EVIDENCE, evidence
    from leantune.recipes.auto import FREEZE_SLOPE, LORA_STEP_OVERHEAD, STEP_PRIOR

    found = evidence(ROOT / "benchmarks/results")
    assert STEP_PRIOR["lora"] == pytest.approx(found["steps_multiplier"]["lora"], abs=0.01)
    freeze3 = 1 + FREEZE_SLOPE * 3 / 6
    assert freeze3 == pytest.approx(found["steps_multiplier"]["freeze3"], abs=0.01)
    overhead = found["step_time"]["overhead"]
    assert overhead["lora"] == pytest.approx(LORA_STEP_OVERHEAD, abs=0.01)
    assert overhead["freeze"] == pytest.approx(1.0, abs=0.05)  # plain backprop: FLOPs predict its time
    committed = json.loads((ROOT / "benchmarks/results/auto-pick" / EVIDENCE).read_text())
    assert committed == json.loads(json.dumps(found))


def test_a_fraction_budget_is_refused_under_a_launcher(monkeypatch, tmp_path):
    from leantune.recipes.auto import resolve_for_run

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(None, ["methods=[{name: auto, budget: 0.5}]", f"output.dir={tmp_path / 'run'}"])
    with pytest.raises(UserError, match="give the budget in bytes"):
        resolve_for_run(cfg, resume=False)


def test_auto_with_other_methods_is_refused():
    with pytest.raises(UserError, match="cannot be combined with lora"):
        load_config(None, ["methods=[auto, lora]"])
    assert load_config(None, ["methods=auto"]).methods[0].name == "auto"


def test_plan_auto_prints_one_line_per_choice(tiny_models, sentiment_csv, tmp_path, capsys):
    from leantune.cli import main

    args = _overrides(tiny_models, sentiment_csv, tmp_path, "4GiB")[:-1]
    out_json = tmp_path / "auto.json"
    assert main(["plan", *args, "--auto", "--memory-budget", "4GiB", "--json", str(out_json)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("auto: ")]
    record = json.loads(out_json.read_text())
    assert [ln.removeprefix("auto: ") for ln in lines] == record["reasons"]
    heads = [ln.split(" ", 2)[1].rstrip(":") for ln in lines]
    assert heads == ["method", "blocks", "rank", "prefix", "train.lr", "passed"]
    assert not (tmp_path / "run").exists()


def test_summary_records_the_choice_and_resume_reuses_it(tiny_models, sentiment_csv, tmp_path, monkeypatch):
    from leantune.recipes import auto
    from leantune.recipes.train import run_train

    overrides = _overrides(tiny_models, sentiment_csv, tmp_path, "4GiB")
    run = tmp_path / "run"
    first = run_train(load_config(None, overrides))
    record = first["methods_auto"]
    assert first["methods"] == [m["name"] for m in record["methods"]] == ["full"]
    assert first["config"]["train"]["lr"] == record["train"]["lr"]
    assert json.loads((run / auto.RECORD).read_text()) == record
    logged = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["reasons"] for r in logged if r.get("split") == "methods_auto"] == [record["reasons"]]

    # resume from step 10 with the same auto config: the recorded choice is reused, never re-planned
    def replan(*_a, **_k):
        raise AssertionError("--resume must reuse the recorded choice")

    monkeypatch.setattr(auto, "choose", replan)
    (run / "checkpoints" / "latest").write_text("step-00000010")
    (run / "summary.json").unlink()
    resumed = run_train(load_config(None, overrides), resume=True)
    assert resumed["train"]["resumed"]
    assert resumed["methods_auto"]["chosen"] == record["chosen"]
    assert resumed["methods_auto"]["reasons"] == record["reasons"]
    assert resumed["methods_auto"]["reused_on_resume"] is True
    assert resumed["weights_sha256_per_rank"] == first["weights_sha256_per_rank"]


def test_time_to_target_reads_each_epochs_own_time_and_interpolates_curves():
    from leantune.bench.time_to_target import steps_to_reach, time_at_step

    assert time_at_step(40, 80, [100.0, 60.0]) == pytest.approx(100.0)  # the end of epoch 1
    assert time_at_step(60, 80, [100.0, 60.0]) == pytest.approx(130.0)  # half of the cheaper epoch 2
    assert time_at_step(10, 80, [100.0, 60.0]) == pytest.approx(25.0)
    assert steps_to_reach([(100, 0.8), (200, 0.9)], 0.85) == pytest.approx(150.0)
    assert steps_to_reach([(100, 0.8), (200, 0.9)], 0.95) is None


def test_committed_time_to_target_is_what_the_artefacts_give():
    """auto-pick/time_to_target.json (quoted by docs/methods/auto.md) recomputed from the run artefacts."""
    from leantune.bench.time_to_target import OUTPUT, compare

    folder = ROOT / "benchmarks/results/auto-pick"
    committed = json.loads((folder / OUTPUT).read_text())
    again = compare("auto-pick", committed["target"], committed["auto_run"], root=ROOT / "benchmarks/results")
    assert json.loads(json.dumps(again)) == committed
    assert committed["auto_pick"] == committed["runs"]["auto"]["methods_auto"]["chosen"]


def test_dry_run_prints_the_choice_and_writes_nothing(tiny_models, sentiment_csv, tmp_path, capsys):
    from leantune.recipes.train import dry_run

    overrides = _overrides(tiny_models, sentiment_csv, tmp_path, "4GiB")
    out = dry_run(load_config(None, overrides))
    printed = capsys.readouterr().out
    assert "auto: method full:" in printed and "would train full on" in printed
    assert out["params"]["trainable_pct"] == pytest.approx(100.0)  # the resolved list, full fine-tuning
    assert not (tmp_path / "run").exists()
