"""train.nan_policy: a NaN loss stops the run naming the step (exit 2), or with `skip` is dropped and
counted; NaN metrics never become the best checkpoint."""

from __future__ import annotations

import json

import pytest

import leantune.train.loop as loop
from tests.conftest import cli_err


@pytest.fixture
def nan_at_step_3(monkeypatch):
    calls = {"n": 0}
    original = loop.backprop_step

    def flaky(model, batch, acc, scale):
        calls["n"] += 1
        loss = original(model, batch, acc, scale)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(loop, "backprop_step", flaky)


def _run(base_overrides, *extra):
    return [o for o in base_overrides if not o.startswith("train.epochs")] + ["train.max_steps=5", *extra]


def test_nan_loss_stops_the_run_naming_the_step(capsys, base_overrides, nan_at_step_3, tmp_path):
    from leantune.cli import main

    code = main(["train", *_run(base_overrides)])
    err = capsys.readouterr().err
    assert code == 2
    assert "training stopped at step 3" in err and "nan_policy=skip" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "summary.json").exists()
    assert not (tmp_path / "run" / "model").exists()


def test_nan_policy_skip_drops_and_counts_the_step(capsys, base_overrides, nan_at_step_3, tmp_path):
    from leantune.cli import main

    assert main(["train", *_run(base_overrides, "train.nan_policy=skip")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train"]["skipped_steps"] == 1 and summary["train"]["steps"] == 5
    assert "1 skipped for a NaN/inf loss" in capsys.readouterr().out


def test_nan_policy_value_is_checked(capsys, base_overrides):
    line = cli_err(capsys, "train", *base_overrides, "train.nan_policy=ignore")
    assert "train.nan_policy" in line


def test_a_nan_metric_is_never_best(monkeypatch, base_overrides, tmp_path):
    from leantune.cli import main

    def nan_eval(*args, **kwargs):
        return {"accuracy": float("nan"), "loss": float("nan")}

    monkeypatch.setattr(loop, "evaluate", nan_eval)
    assert main(["train", *_run(base_overrides)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train"]["best_step"] is None
    assert not (tmp_path / "run" / "best.safetensors").exists()
