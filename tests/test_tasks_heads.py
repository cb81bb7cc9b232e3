"""Regression and multi-label tasks: exact parsing and metric semantics, and small runs whose numbers
must beat the do-nothing baselines (the mean score; each label's majority value), reloaded by eval,
predict and export with their heads."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from leantune.config import load_config
from leantune.data.tasks import label_set, multi_hot, score_value
from leantune.errors import UserError
from leantune.eval.metrics import multi_label_metrics, regression_metrics
from leantune.recipes.train import run_train
from tests.conftest import FILLER, NEGATIVE, POSITIVE, write_csv

TOPICS = {
    "sport": ["football", "tennis", "coach"],
    "food": ["bread", "cheese", "soup"],
    "art": ["paint", "museum", "poem"],
}


def regression_rows(n: int, seed: int = 0) -> list[dict]:
    """score = (#positive - #negative sentiment words), 0-2 of them among filler words: -2..2."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(FILLER, 4)
        picked = [rng.choice([POSITIVE, NEGATIVE]) for _ in range(rng.randint(0, 2))]
        for pool in picked:
            words.insert(rng.randrange(len(words) + 1), rng.choice(pool))
        score = sum(1 if pool is POSITIVE else -1 for pool in picked)
        rows.append({"text": " ".join(words), "score": float(score)})
    return rows


def topic_rows(n: int, seed: int = 0) -> list[dict]:
    """Each row mentions 1-2 of three topics by keyword; `labels` is their JSON list."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        chosen = sorted(rng.sample(sorted(TOPICS), rng.choice([1, 1, 2])))
        words = rng.sample(FILLER, 4) + [rng.choice(TOPICS[t]) for t in chosen]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "labels": json.dumps(chosen)})
    return rows


# --- parsing: exact, and one line naming the row ----------------------------------------------------


def test_score_values_and_refusals():
    assert score_value({"s": " -1.5 ", "_line": 3}, "s", "f") == -1.5
    assert score_value({"s": 2, "_line": 3}, "s", "f") == 2.0
    for bad, phrase in (("high", "not a number"), ("inf", "not a finite number"), (True, "not a number")):
        with pytest.raises(UserError, match=rf"f line 7: 's' is .*{phrase}"):
            score_value({"s": bad, "_line": 7}, "s", "f")
    with pytest.raises(UserError, match="f line 7: 's' is 'nan', a missing value"):
        score_value({"s": "nan", "_line": 7}, "s", "f")


def test_label_sets_from_json_lists_separators_and_single_cells():
    cfg = load_config(None, ["task=multi_label", "data.label_column=y"]).data
    row = {"y": '["b", "a", "b"]', "_line": 2}
    assert label_set(row, "y", None, False, "f") == ["b", "a"]  # deduplicated, in order
    assert label_set({"y": ["a", 1.0]}, "y", None, False, "f") == ["a", "1"]  # JSON's 1.0 is label "1"
    assert label_set({"y": "a|c"}, "y", "|", False, "f") == ["a", "c"]
    assert label_set({"y": "a"}, "y", None, False, "f") == ["a"]
    assert label_set({"y": "[]"}, "y", None, True, "f") == []
    assert label_set({"y": ""}, "y", "|", True, "f") == []
    assert multi_hot({"y": '["c", "a"]'}, cfg, ["a", "b", "c"], "f") == [1.0, 0.0, 1.0]
    with pytest.raises(UserError, match="f line 4: 'y' holds no label; .*allow_empty_labels=true"):
        label_set({"y": "[]", "_line": 4}, "y", None, False, "f")
    with pytest.raises(UserError, match="f line 5: label 'z' is not one of the labels"):
        multi_hot({"y": '["a", "z"]', "_line": 5}, cfg, ["a", "b"], "f")


# --- metric semantics ---------------------------------------------------------------------------------


def test_regression_metrics_equal_references():
    from scipy.stats import pearsonr, spearmanr

    rng = np.random.default_rng(0)
    y = rng.normal(size=50)
    p = y + rng.normal(scale=0.5, size=50)
    got = regression_metrics(p.tolist(), y.tolist())
    assert got["mse"] == pytest.approx(float(((p - y) ** 2).mean()), rel=1e-12)
    assert got["rmse"] == pytest.approx(math.sqrt(got["mse"]), rel=1e-12)
    assert got["mae"] == pytest.approx(float(np.abs(p - y).mean()), rel=1e-12)
    assert got["pearson"] == pytest.approx(pearsonr(p, y).statistic, rel=1e-12)
    assert got["spearman"] == pytest.approx(spearmanr(p, y).statistic, rel=1e-12)
    assert got["baseline_mse"] == pytest.approx(float(y.var()), rel=1e-12)  # the mean as a constant
    assert regression_metrics([1.0, 1.0], [0.0, 2.0])["pearson"] == 0.0  # constant: undefined -> 0


def test_multi_label_threshold_and_metrics_by_hand():
    names = ["a", "b", "c"]
    labels = [[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0]]
    probs = [[0.5, 0.49, 0.0], [0.9, 0.7, 0.6], [0.1, 0.2, 0.8], [0.0, 0.0, 0.0]]
    m = multi_label_metrics(probs, labels, names, threshold=0.5)
    # predicted sets (p >= 0.5): {a}, {a,b,c}, {c}, {} -> TP 4, FP 1, FN 0
    assert m["micro_precision"] == pytest.approx(4 / 5)
    assert m["micro_recall"] == 1.0
    assert m["micro_f1"] == pytest.approx(2 * 0.8 / 1.8)
    assert m["subset_accuracy"] == 0.75  # rows 1, 3 and 4 exactly right
    assert m["f1/c"] == pytest.approx(2 / 3) and m["precision/c"] == 0.5 and m["recall/c"] == 1.0
    assert m["macro_f1"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert m["majority_micro_f1"] == 0.0  # every label is absent in most rows
    strict = multi_label_metrics(probs, labels, names, threshold=0.51)  # 0.5 is now below
    assert strict["recall/a"] == 0.5 and strict["subset_accuracy"] == 0.5


# --- runs -----------------------------------------------------------------------------------------------


def _overrides(tiny_models, data: Path, out: Path, task: str, column: str, *extra: str) -> list[str]:
    return [
        f"task={task}",
        f"model.name={tiny_models['bert']}",
        "model.max_length=16",
        f"data.source={data}",
        f"data.label_column={column}",
        "train.batch_size=16",
        "train.lr=3e-3",
        "train.num_threads=1",
        "train.save_every=null",
        "output.tensorboard=false",
        f"output.dir={out}",
        # full fine-tuning: a random-initialised tiny model learns these in seconds, LoRA on it slowly
        # (every method's regression and multi-label head trains and reloads: test_method_contract.py)
        "methods=[full]",
        *extra,
    ]


def _train_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r and r.get("split") is None]


@pytest.fixture(scope="module")
def regression_run(tiny_models, tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("regression")
    data = write_csv(root / "scores.csv", regression_rows(320))
    summary = run_train(
        load_config(
            None, _overrides(tiny_models, data, root / "run", "regression", "score", "train.epochs=6")
        )
    )
    return root / "run", summary


@pytest.fixture(scope="module")
def multi_label_run(tiny_models, tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("multi_label")
    data = write_csv(root / "topics.csv", topic_rows(320))
    summary = run_train(
        load_config(
            None, _overrides(tiny_models, data, root / "run", "multi_label", "labels", "train.epochs=8")
        )
    )
    return root / "run", summary


def test_regression_learns_beyond_the_mean(regression_run):
    run, s = regression_run
    losses = _train_losses(run)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    test = s["test"]
    assert test["mse"] < 0.5 * test["baseline_mse"], test  # the constant-mean prediction's MSE
    assert test["pearson"] > 0.7 and test["spearman"] > 0.7, test
    assert test["loss"] == pytest.approx(test["mse"], rel=1e-5)  # the loss is the MSE
    assert s["train"]["metric"] == "mse" and not s.get("warnings")


def test_regression_eval_and_predict_reload_the_head(regression_run, tmp_path, capsys):
    from leantune.cli import main

    run, s = regression_run
    assert main(["eval", str(run), "--out", str(tmp_path / "eval.json")]) == 0
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["mse"] == pytest.approx(s["test"]["mse"], rel=1e-5)
    rows = regression_rows(40, seed=9)
    data = write_csv(tmp_path / "new.csv", rows)
    assert main(["predict", str(run), str(data), "--out", str(tmp_path / "pred.csv")]) == 0
    written = list(csv.DictReader((tmp_path / "pred.csv").open()))
    preds = [float(r["prediction"]) for r in written]
    assert "prob_0" not in written[0]
    mse = float(np.mean([(p - r["score"]) ** 2 for p, r in zip(preds, rows, strict=True)]))
    assert f"mse {mse:.4f}" in capsys.readouterr().out
    assert mse < 0.5 * float(np.var([r["score"] for r in rows]))


def test_multi_label_beats_all_majority(multi_label_run):
    run, s = multi_label_run
    losses = _train_losses(run)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    test = s["test"]
    assert test["micro_f1"] > test["majority_micro_f1"] + 0.2, test
    assert test["subset_accuracy"] > 0.25, test
    assert all(test[f"f1/{t}"] > 0.5 for t in TOPICS), test
    assert s["config"]["data"]["label_names"] == ["art", "food", "sport"]


def test_multi_label_predict_eval_export_reload(multi_label_run, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from leantune.cli import main
    from leantune.eval.loop import evaluate
    from leantune.models.loader import load_tokenizer
    from leantune.recipes.common import load_run_config, load_trained_model

    run, s = multi_label_run
    rows = [{"text": "we like cheese and football today"}, {"text": "a poem in the museum"}]
    data = tmp_path / "new.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["predict", str(run), str(data), "--out", str(tmp_path / "pred.jsonl")]) == 0
    written = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert written[0]["prediction"] == ["food", "sport"] or "art" in written[1]["prediction"]
    for w in written:  # the set is exactly the labels at or above the threshold
        assert w["prediction"] == [n for n in ("art", "food", "sport") if w[f"prob_{n}"] >= 0.5]

    # eval's numbers: padded batches give what one unpadded row at a time gives
    cfg = load_run_config(run)
    tok = load_tokenizer(str(run / "model"))
    model = load_trained_model(run, cfg).eval()
    from leantune.data.tasks import encode

    feats = encode("multi_label", topic_rows(30, seed=5), tok, cfg.data, 16, cfg.data.label_names, "x")
    batched = evaluate(model, feats, "multi_label", 8, tok.pad_token_id, label_names=cfg.data.label_names)
    single = evaluate(model, feats, "multi_label", 1, tok.pad_token_id, label_names=cfg.data.label_names)
    for key in ("micro_f1", "subset_accuracy", "loss"):
        assert batched[key] == pytest.approx(single[key], abs=1e-5)

    assert main(["export", str(run), "--merge", "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged"))
    assert merged.config.problem_type == "multi_label_classification" and merged.config.num_labels == 3
    enc = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        got = merged.eval()(**enc).logits
        want = model(**enc).logits
    assert (got - want).abs().max().item() < 1e-4


# --- sequence classification with a decoder LLM (configs/classify-smollm2.yaml on a tiny Llama) --------


@pytest.mark.slow  # ~30-60 s on the shared 2-core machine
def test_decoder_llm_classifies_with_lora_and_reloads(tiny_models, sentiment_csv, tmp_path, capsys):
    """A Llama gets a `score` head over its last non-padding token; LoRA trains it through peft's
    modules_to_save, and `leantune eval` reloads adapter + head to the same numbers."""
    from leantune.cli import main
    from leantune.data.tasks import collate
    from leantune.models.loader import load_tokenizer
    from leantune.recipes.common import load_run_config, load_trained_model

    out = tmp_path / "run"
    overrides = [
        f"model.name={tiny_models['llama']}",
        "model.max_length=16",
        f"data.source={sentiment_csv}",
        "methods=[{name: lora, r: 16, dropout: 0.0, target_modules: all-linear}]",
        "train.batch_size=16",
        "train.lr=1e-2",
        "train.epochs=5",
        "train.num_threads=1",
        "train.save_every=null",
        "output.tensorboard=false",
        f"output.dir={out}",
    ]
    s = run_train(load_config(None, overrides))
    assert s["test"]["accuracy"] > s["test"]["majority_accuracy"] + 0.2, s["test"]
    assert any("score" in k for k in _adapter_keys(out / "model"))  # the head is saved with the adapter
    assert main(["eval", str(out), "--out", str(tmp_path / "eval.json")]) == 0
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["accuracy"] == s["test"]["accuracy"]
    assert again["loss"] == pytest.approx(s["test"]["loss"], abs=1e-5)

    # the head reads the last real token: padding a row does not change its logits
    cfg = load_run_config(out)
    tok = load_tokenizer(str(out / "model"))
    model = load_trained_model(out, cfg).eval()
    short, long = (
        tok("a great film")["input_ids"],
        tok("the plot was dull and the acting painful")["input_ids"],
    )
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([short])).logits
        batch = collate(
            [
                {"input_ids": short, "attention_mask": [1] * len(short)},
                {"input_ids": long, "attention_mask": [1] * len(long)},
            ],
            tok.pad_token_id,
        )
        padded = model(**batch).logits[:1]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)


def _adapter_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as fh:
        return list(fh.keys())
