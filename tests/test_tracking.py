"""Experiment trackers (`output.report_to`) through accelerate: the tensorboard events hold exactly the
logged numbers (loss, lr, evaluation and test metrics, memory, the methods' reports, the config), a
resumed run's events read as one run, and a tracker whose package is missing is refused in one line
before any model loads, with nothing written."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import yaml

from leantune.config import load_config
from leantune.recipes.train import run_train
from tests.conftest import cli_err

TB = ("output.tensorboard=true", "output.report_to=tensorboard")


def _events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "trackers" / "leantune"), size_guidance={"scalars": 0})
    events.Reload()
    return events


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_holds_the_logged_numbers(base_overrides, tmp_path):
    run = tmp_path / "run"
    summary = run_train(
        load_config(
            None,
            [
                *base_overrides,
                *TB,
                "methods=[{name: lora_sp, r: 4}]",
                "train.log_every=5",
                "train.epochs=2",
            ],
        )
    )
    events, records = _events(run), _records(run)
    scalars = events.Tags()["scalars"]
    train = [r for r in records if "loss" in r and r.get("split") is None]
    evals = [r for r in records if r.get("split") == "validation"]

    def series(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in events.Scalars(tag)]

    assert series("train/loss") == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in train]
    assert series("train/lr") == [(r["step"], pytest.approx(r["lr"], rel=1e-6)) for r in train]
    assert series("validation/accuracy") == [
        (r["step"], pytest.approx(r["accuracy"], rel=1e-6)) for r in evals
    ]
    last = summary["train"]["steps"]
    assert series("test/accuracy") == [(last, pytest.approx(summary["test"]["accuracy"], rel=1e-6))]
    rss = series("memory/peak_rss_mib")
    peak = summary["memory"]["peak_rss_bytes"]
    assert series("memory/peak_rss_bytes") == [(last, pytest.approx(peak, rel=1e-6))]
    values = [v for _, v in rss]  # per logged step, in MiB: a peak never falls, nor passes the run's
    assert values == sorted(values) and 0 < values[-1] <= peak / 2**20 * (1 + 1e-6)
    report = summary["method_reports"]["lora_sp"]
    assert series("methods/lora_sp.trainable_entries") == [(last, report["trainable_entries"])]
    assert series("methods/lora_sp.achieved_density") == [(last, pytest.approx(0.5))]
    assert "train/grad_norm" in scalars and "train/samples_per_s" in scalars
    # the resolved config, flattened: accelerate writes it beside the events as hparams.yml
    (hparams_file,) = (run / "trackers" / "leantune").glob("*/hparams.yml")
    config = yaml.safe_load(hparams_file.read_text())
    assert config["train.lr"] == 3e-3 and config["methods.0.name"] == "lora_sp"
    assert config["output.report_to.0"] == "tensorboard"


def test_resumed_run_reads_as_one_run(base_overrides, tmp_path):
    """Killed after the step-4 checkpoint and resumed: every train/loss step appears once, with the
    uninterrupted run's value (tensorboard's purge drops the events logged after the checkpoint)."""
    run = tmp_path / "run"
    overrides = [
        *base_overrides,
        *TB,
        "methods=[full]",
        "train.max_steps=8",
        "train.save_every=4",
        "train.log_every=2",
    ]
    run_train(load_config(None, overrides))
    full = [(e.step, e.value) for e in _events(run).Scalars("train/loss")]
    (run / "checkpoints" / "latest").write_text("step-00000004")  # as if killed after that checkpoint
    (run / "summary.json").unlink()
    run_train(load_config(None, overrides), resume=True)
    resumed = [(e.step, e.value) for e in _events(run).Scalars("train/loss")]
    assert [s for s, _ in resumed] == [2, 4, 6, 8]
    assert resumed == [(s, pytest.approx(v, rel=1e-6)) for s, v in full]


def test_no_tracker_writes_no_tracker_files(base_overrides, tmp_path):
    run_train(load_config(None, [*base_overrides, "output.report_to=none", "train.max_steps=2"]))
    assert not (tmp_path / "run" / "trackers").exists()
    assert _records(tmp_path / "run")  # metrics.jsonl is always written


@pytest.mark.parametrize("tracker", ["wandb", "mlflow", "trackio"])
def test_missing_tracker_package_is_one_line_before_the_model_loads(
    capsys, monkeypatch, base_overrides, tmp_path, tracker
):
    import leantune.models.loader as loader

    if importlib.util.find_spec(tracker) is not None:
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == tracker else real(n, *a))

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the tracker check")

    monkeypatch.setattr(loader, "load_model", no_model)
    line = cli_err(capsys, "train", *base_overrides, f"output.report_to=[tensorboard, {tracker}]")
    assert f"pip install {tracker}" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed here")
def test_wandb_offline_run_lands_in_the_run_folder(base_overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_train(load_config(None, [*base_overrides, "output.report_to=wandb", "train.max_steps=2"]))
    assert list((tmp_path / "run" / "trackers" / "wandb").glob("offline-run-*"))


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed here")
def test_mlflow_store_lands_in_the_run_folder(base_overrides, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_train(load_config(None, [*base_overrides, "output.report_to=mlflow", "train.max_steps=2"]))
    assert (tmp_path / "run" / "trackers" / "mlruns").is_dir()
    assert os.environ.get("MLFLOW_TRACKING_URI") is None
