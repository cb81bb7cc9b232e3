"""summary.json's one typed writer (`leantune.train.summary.RunSummary`): the keys and their order that the
bench runner, the report, the model card and the docs read, for both producers (leantune train and the
HF Trainer baseline). No model is loaded: the end-to-end runs are in test_train.py and test_bench.py."""

from __future__ import annotations

import json

from leantune.train.summary import RunSummary, TrainStats, format_summary, per_second, quality_warnings

TOP = ["run_dir", "task", "methods", "params", "data", "train", "validation", "test", "memory", "world_size"]
ENV = ["versions", "machine", "config"]
TRAIN = ["steps", "epochs_completed", "stopped_early", "resumed", "train_time_s", "eval_time_s"]
RATES = ["samples_per_s", "tokens_per_s", "best_step", "best_metric", "metric"]


def _summary(**extra) -> RunSummary:
    stats = TrainStats(
        steps=4,
        epochs_completed=1,
        stopped_early=False,
        resumed=False,
        train_time_s=2.0,
        eval_time_s=0.5,
        samples_per_s=per_second(64, 2.0),
        tokens_per_s=per_second(640, 2.0),
        best_step=None,
        best_metric=None,
        metric="accuracy",
        **extra.pop("train", {}),
    )
    return RunSummary(
        run_dir="runs/x",
        task="classification",
        methods=["lora"],
        params={"trainable": 10, "total": 100, "trainable_pct": 10.0},
        data={"train": 64, "validation": 8, "test": 8},
        train=stats,
        validation={},
        test={"accuracy": 0.5, "majority_accuracy": 0.5},
        memory={"peak_rss_bytes": 2**30},
        world_size=1,
        versions={"python": "3"},
        machine={},
        config={},
        **extra,
    )


def test_a_baseline_summary_writes_only_its_keys_in_order(tmp_path):
    s = _summary(baseline={"framework": "transformers.Trainer"}, wall_time_s=3.0)
    d = s.to_dict()
    assert list(d) == [*TOP, *ENV, "baseline", "wall_time_s"]
    assert list(d["train"]) == [*TRAIN, *RATES]  # best_step/best_metric are written even when None
    s.write(tmp_path / "summary.json")
    assert json.loads((tmp_path / "summary.json").read_text()) == d
    assert (tmp_path / "summary.json").read_text() == s.to_json() and s.to_json().endswith("}\n")
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary left behind


def test_a_leantune_summary_keeps_its_optional_parts_where_they_were():
    s = _summary(
        method_reports={},  # empty, but a leantune run always writes it
        mmlu={"shots": 1, "accuracy": 0.25, "n": 8},
        weights_sha256_per_rank=["abc"],
        wall_time_s=3.0,
        warnings=[],
        train={
            "skipped_steps": 0,
            "resume_forced_changes": ["train.lr"],
            "epoch_train_time_s": [2.0],
            "train_cpu_time_s": 3.0,
            "prefix_cache": {"bytes": 1},
        },
    )
    d = s.to_dict()
    top = [*TOP[:3], "method_reports", *TOP[3:8], "mmlu", *TOP[8:], "weights_sha256_per_rank", *ENV]
    assert list(d) == [*top, "wall_time_s", "warnings"]
    assert list(d["train"]) == [
        *TRAIN[:3],
        "skipped_steps",
        "resumed",
        "resume_forced_changes",
        "train_time_s",
        "epoch_train_time_s",
        "train_cpu_time_s",
        "cpu_utilisation",
        *TRAIN[5:],
        *RATES,
        "prefix_cache",
    ]
    assert d["train"]["cpu_utilisation"] == 1.5  # 3 CPU seconds over 2 s of training: 1.5 cores busy


def test_the_console_table_and_warnings_read_the_object_or_its_dict():
    s = _summary(wall_time_s=3.0)
    assert format_summary(s) == format_summary(s.to_dict())
    assert "samples/s" in format_summary(s) and "test accuracy" in format_summary(s)
    assert quality_warnings(s) == quality_warnings(s.to_dict()) and len(quality_warnings(s)) == 1
