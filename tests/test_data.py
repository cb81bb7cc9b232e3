"""Data sources, splits, label mapping, tokenisation and collation."""

from __future__ import annotations

import json

import pytest

from leantune.config import DataConfig
from leantune.data.sources import carve, load_source
from leantune.data.tasks import IGNORE_INDEX, collate, encode, infer_label_names, load_raw_splits
from tests.conftest import make_sentiment_rows, write_csv


@pytest.fixture(scope="module")
def tok():
    from leantune.models.loader import load_tokenizer

    return load_tokenizer("embedded:minilm")


def test_carve_is_seeded_disjoint_and_complete():
    rows = [{"i": i} for i in range(100)]
    rest, held = carve(rows, 0.2, seed=3)
    assert len(held) == 20 and len(rest) == 80
    assert {r["i"] for r in rest} | {r["i"] for r in held} == set(range(100))
    assert carve(rows, 0.2, seed=3)[1] == held
    assert carve(rows, 0.2, seed=4)[1] != held


def test_single_file_gets_validation_and_test_carved(sentiment_csv):
    raw = load_raw_splits(DataConfig(source=str(sentiment_csv), validation_fraction=0.1, test_fraction=0.2))
    assert (len(raw.train), len(raw.validation), len(raw.test)) == (230, 26, 64)
    lines = [r["_line"] for r in raw.train + raw.validation + raw.test]
    assert sorted(lines) == list(range(2, 322))  # every row once, with its file line number


def test_folder_of_split_files(tmp_path):
    for split, n in (("train", 30), ("validation", 10), ("test", 12)):
        write_csv(tmp_path / f"{split}.csv", make_sentiment_rows(n, seed=n))
    raw = load_raw_splits(DataConfig(source=str(tmp_path)))
    assert (len(raw.train), len(raw.validation), len(raw.test)) == (30, 10, 12)


def test_jsonl_and_max_samples(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_sentiment_rows(50)))
    raw = load_raw_splits(DataConfig(source=str(path), max_train_samples=10, max_eval_samples=3))
    assert len(raw.train) == 10 and len(raw.validation) == 3 and len(raw.test) == 3


def test_hf_datasets_source_reads_a_local_dataset_folder(tmp_path):
    write_csv(tmp_path / "train.csv", make_sentiment_rows(20))
    write_csv(tmp_path / "test.csv", make_sentiment_rows(8, seed=1))
    splits, _ = load_source(f"hf:{tmp_path}")
    assert set(splits) == {"train", "test"} and len(splits["train"]) == 20
    assert splits["test"][0]["text"] == make_sentiment_rows(8, seed=1)[0]["text"]


def test_label_names_inferred_in_a_stable_order():
    assert infer_label_names([{"y": "pos"}, {"y": "neg"}], "y") == ["neg", "pos"]
    assert infer_label_names([{"y": 10}, {"y": 2}, {"y": 0}], "y") == ["0", "2", "10"]


def test_integer_labels_map_onto_named_classes(tok):
    cfg = DataConfig(source="x")
    rows = [{"text": "good", "label": 1, "_line": 2}, {"text": "bad", "label": "negative", "_line": 3}]
    feats = encode("classification", rows, tok, cfg, 16, ["negative", "positive"], "x")
    assert [f["labels"] for f in feats] == [1, 0]


def test_pair_classification_uses_segment_ids(tok):
    cfg = DataConfig(source="x", text_pair_column="claim")
    rows = [{"text": "the sky is blue", "claim": "the sky has a colour", "label": "yes", "_line": 2}]
    feat = encode("classification", rows, tok, cfg, 32, ["no", "yes"], "x")[0]
    assert set(feat["token_type_ids"]) == {0, 1}
    assert feat["input_ids"].count(tok.sep_token_id) == 2


def test_causal_lm_masks_the_prompt(tok):
    cfg = DataConfig(source="x")
    rows = [{"text": "question one", "label": "answer", "_line": 2}]
    feat = encode("causal_lm", rows, tok, cfg, 32, None, "x")[0]
    prompt_len = len(tok("question one")["input_ids"])
    assert feat["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert feat["labels"][prompt_len:] == feat["input_ids"][prompt_len:]
    plain = encode("causal_lm", rows, tok, DataConfig(source="x", label_column=None), 32, None, "x")[0]
    assert plain["labels"] == plain["input_ids"]


def test_seq2seq_targets(tok):
    rows = [{"text": "hello world", "label": "bonjour le monde", "_line": 2}]
    feat = encode("seq2seq", rows, tok, DataConfig(source="x"), 32, None, "x")[0]
    assert feat["labels"] == tok(text_target="bonjour le monde")["input_ids"]


def test_collate_pads_dynamically(tok):
    feats = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [5, 6, 7]},
        {"input_ids": [5], "attention_mask": [1], "labels": [IGNORE_INDEX]},
    ]
    batch = collate(feats, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [IGNORE_INDEX] * 3]


def test_truncation_to_max_length(tok):
    rows = [{"text": "word " * 100, "label": "a", "_line": 2}]
    feat = encode("classification", rows, tok, DataConfig(source="x"), 12, ["a"], "x")[0]
    assert len(feat["input_ids"]) == 12


@pytest.mark.slow
def test_builtin_rotten_tomatoes_is_real_and_cached(tmp_path, monkeypatch):
    from leantune.data.builtin import load_builtin

    monkeypatch.setenv("LEANTUNE_CACHE", str(tmp_path))
    splits, names = load_builtin("rotten_tomatoes")
    rows = splits["train"]
    assert names == ["negative", "positive"]
    assert len(rows) == 10_568
    assert sum(r["label"] == "positive" for r in rows) == 5_242
    assert (tmp_path / "data" / "rotten_tomatoes.tsv").is_file()


def test_csv_with_byte_order_mark(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufefftext,label\ngood,pos\n".encode())
    raw = load_raw_splits(DataConfig(source=str(path), validation_fraction=0, test_fraction=0))
    assert raw.train[0]["text"] == "good"


def test_json_numbers_one_label_per_value():
    rows = [{"y": 1}, {"y": 1.0}, {"y": 0}]
    assert infer_label_names(rows, "y") == ["0", "1"]


def test_long_causal_prompt_keeps_the_response(tok):
    rows = [{"text": "word " * 40, "label": "the answer", "_line": 2}]
    feat = encode("causal_lm", rows, tok, DataConfig(source="x"), 12, None, "x")[0]
    target = tok("the answer", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(feat["input_ids"]) == 12
    assert feat["labels"][-len(target) :] == target == feat["input_ids"][-len(target) :]
