"""Every bad input gives one clear line on stderr, exit code 2, no traceback, and nothing overwritten."""

from __future__ import annotations

import pytest

from leantune.runfolder import MARKER, RunFolder
from tests.conftest import cli_err, make_sentiment_rows, write_csv


def train_err(capsys, overrides: list[str], *extra: str) -> str:
    return cli_err(capsys, "train", *overrides, *extra)


def test_typo_in_key_suggests_the_right_one(capsys, base_overrides):
    line = train_err(capsys, base_overrides, "train.lrr=0.1")
    assert "unknown config key 'train.lrr'" in line and "'lr'" in line


def test_typo_in_section(capsys, base_overrides):
    line = train_err(capsys, base_overrides, "trian.lr=0.1")
    assert "unknown config key 'trian'" in line and "'train'" in line


def test_wrong_type(capsys, base_overrides):
    line = train_err(capsys, base_overrides, "train.lr=fast")
    assert "train.lr" in line and "'fast'" in line


def test_typo_in_method_key(capsys, base_overrides):
    line = train_err(capsys, base_overrides, "methods=[{name: lora, rank: 8}]")
    assert "methods.0.rank" in line and ("'r'" in line or " r, " in line)


def test_unknown_method(capsys, base_overrides):
    line = train_err(capsys, base_overrides, "methods=[{name: lorra}]")
    assert "unknown method 'lorra'" in line and "'lora'" in line


def test_missing_config_file(capsys, tmp_path):
    line = cli_err(capsys, "train", str(tmp_path / "nope.yaml"))
    assert "config file not found" in line


def test_invalid_yaml(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1,\n")
    line = cli_err(capsys, "train", str(bad))
    assert "not valid YAML" in line


def test_missing_data_file(capsys, base_overrides, tmp_path):
    line = train_err(capsys, base_overrides, f"data.source={tmp_path / 'missing.csv'}")
    assert "data file not found" in line and "missing.csv" in line


def test_model_path_that_does_not_exist(capsys, base_overrides, tmp_path):
    line = train_err(capsys, base_overrides, f"model.name={tmp_path / 'no-model'}")
    assert "model path not found" in line


@pytest.mark.parametrize("hub_id", ["someone/some-model", "Qwen/Qwen2.5-0.5B"])
def test_hub_id_offline(capsys, base_overrides, hub_id):
    line = train_err(capsys, base_overrides, f"model.name={hub_id}")
    assert f"cannot load model '{hub_id}'" in line and "offline" in line


def test_empty_split(capsys, base_overrides, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_csv(folder / "train.csv", make_sentiment_rows(40))
    (folder / "validation.csv").write_text("text,label\n")
    line = train_err(capsys, base_overrides, f"data.source={folder}")
    assert "split 'validation'" in line and "empty" in line


def test_empty_training_file(capsys, base_overrides, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    line = train_err(capsys, base_overrides, f"data.source={empty}")
    assert "training split" in line and "empty" in line


def test_label_column_absent(capsys, base_overrides):
    line = train_err(capsys, base_overrides, "data.label_column=sentiment")
    assert "column 'sentiment' not found" in line and "data.label_column" in line


def test_text_column_absent(capsys, base_overrides):
    line = train_err(capsys, base_overrides, "data.text_column=review")
    assert "column 'review' not found" in line and "data.text_column" in line


def test_label_outside_label_set_names_the_line(capsys, base_overrides, tmp_path):
    rows = make_sentiment_rows(40)
    rows[7]["label"] = "neutral"
    path = write_csv(tmp_path / "bad_label.csv", rows)
    line = train_err(capsys, base_overrides, f"data.source={path}", "data.label_names=[neg, pos]")
    assert "line 9" in line and "'neutral'" in line  # header is line 1, rows[7] is line 9


def test_bad_csv_row_names_the_line(capsys, base_overrides, tmp_path):
    path = write_csv(tmp_path / "ragged.csv", make_sentiment_rows(20))
    lines = path.read_text().splitlines()
    lines[5] += ",extra"
    path.write_text("\n".join(lines) + "\n")
    line = train_err(capsys, base_overrides, f"data.source={path}")
    assert "line 6" in line and "expected 2 fields, found 3" in line


def test_bad_jsonl_row_names_the_line(capsys, base_overrides, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "good film", "label": "pos"}\n{"text": "oops"\n')
    line = train_err(capsys, base_overrides, f"data.source={path}")
    assert "line 2" in line and "invalid JSON" in line


def test_lora_target_that_matches_nothing(capsys, base_overrides):
    line = train_err(capsys, base_overrides, "methods=[{name: lora, target_modules: [q_proj]}]")
    assert "'q_proj' matches no module" in line and "query" in line


def test_freeze_more_layers_than_the_model_has(capsys, base_overrides):
    line = train_err(capsys, base_overrides, "methods=[{name: freeze, layers: 9}]")
    assert "layers=9" in line and "3 blocks" in line


def test_existing_run_is_not_overwritten(capsys, base_overrides, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    precious = run / "summary.json"
    precious.write_text("keep me")
    (run / "config.yaml").write_text("task: classification\n")
    RunFolder(run).write_marker("0" * 64, "0.0")
    line = train_err(capsys, base_overrides)
    assert "already holds a run" in line and "--resume" in line
    assert precious.read_text() == "keep me"
    assert sorted(p.name for p in run.iterdir()) == [MARKER, "config.yaml", "summary.json"]


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(capsys, base_overrides, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "thesis.tex").write_text("years of work")
    line = train_err(capsys, base_overrides, "output.overwrite=true")
    assert "did not write (thesis.tex)" in line
    assert (run / "thesis.tex").read_text() == "years of work"


def test_resume_without_checkpoint(capsys, base_overrides):
    line = train_err(capsys, base_overrides, "--resume")
    assert "nothing to resume" in line


def test_bad_input_writes_nothing(capsys, base_overrides, tmp_path):
    train_err(capsys, base_overrides, "data.label_column=sentiment")
    assert not (tmp_path / "run").exists()


def test_eval_on_a_folder_that_is_not_a_run(capsys, tmp_path):
    line = cli_err(capsys, "eval", str(tmp_path))
    assert "is not a leantune run" in line


def test_unknown_cli_option(capsys):
    line = cli_err(capsys, "train", "--no-such-flag")
    assert "--no-such-flag" in line


def test_override_without_equals(capsys, base_overrides):
    line = train_err(capsys, base_overrides, "train.lr")
    assert "not key=value" in line


@pytest.mark.parametrize("value", ["0", "-1"])
def test_out_of_range(capsys, base_overrides, value):
    line = train_err(capsys, base_overrides, f"train.batch_size={value}")
    assert "train.batch_size" in line and "greater than 0" in line


def test_unknown_builtin_dataset(capsys, base_overrides):
    line = train_err(capsys, base_overrides, "data.source=builtin:imdb")
    assert "unknown built-in dataset 'imdb'" in line


def test_no_trainable_parameters(capsys, base_overrides):
    line = train_err(
        capsys, base_overrides, "methods=[{name: freeze, layers: 3, modules: [pooler, classifier]}]"
    )
    assert "no trainable parameter" in line


def test_unknown_eval_metric(capsys, base_overrides):
    line = train_err(capsys, base_overrides, "eval.metric=acuracy")
    assert "'acuracy'" in line and "'accuracy'" in line


def test_classification_without_label_column(capsys, base_overrides):
    line = train_err(capsys, base_overrides, "data.label_column=null")
    assert "needs data.label_column" in line


def test_override_into_a_value(capsys, base_overrides):
    line = train_err(capsys, base_overrides, "train.lr.x=2")
    assert "'train.lr' is a value, not a section" in line


def test_invalid_freeze_regex(capsys, base_overrides):
    line = train_err(capsys, base_overrides, "methods=[{name: freeze, modules: ['(']}]")
    assert "not a valid regular expression" in line


def test_max_length_beyond_the_models_positions(capsys, base_overrides):
    line = train_err(capsys, base_overrides, "model.max_length=512")
    assert "exceeds the 128 positions" in line


def test_a_single_class_is_not_classification(capsys, base_overrides, tmp_path):
    rows = [r for r in make_sentiment_rows(40) if r["label"] == "pos"]
    line = train_err(capsys, base_overrides, f"data.source={write_csv(tmp_path / 'one.csv', rows)}")
    assert "at least 2" in line


def test_non_utf8_file(capsys, base_overrides, tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ncaf\xe9 au lait,pos\n".encode("latin-1"))
    line = train_err(capsys, base_overrides, f"data.source={path}")
    assert "not UTF-8" in line


def test_eval_of_an_unfinished_run(capsys, tmp_path):
    (tmp_path / "config.yaml").write_text("task: classification\n")
    line = cli_err(capsys, "eval", str(tmp_path))
    assert "has no saved model" in line
