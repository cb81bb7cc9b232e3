"""The tokenised training data is memory-mapped: what Python holds does not grow with the number of rows."""

from __future__ import annotations

import gc
import tracemalloc

from leantune.config import load_config
from leantune.data.arrow_features import ArrowFeatures
from leantune.data.tasks import collate, encode
from leantune.models.loader import load_tokenizer
from leantune.recipes.train import build_features
from leantune.train.batching import epoch_batches
from tests.conftest import make_sentiment_rows, write_csv

N = 500


def _cfg(tiny_models, csv_path):
    return load_config(
        None,
        [f"model.name={tiny_models['bert']}", "model.max_length=32", f"data.source={csv_path}"],
    )


def _held_and_epoch_peak(cfg, tok) -> tuple[int, int, object]:
    """Python bytes still held after building the data, and the peak above that over one epoch."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        data = build_features(cfg, tok)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
        train = data["train"]
        # The sampler's order is the one O(rows) structure left (~100 bytes a row, as before this change)
        batches = epoch_batches(train.lengths(), 16, 0, 0)
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        for idx in batches:  # the peak includes cyclic garbage up to a gc pass: it plateaus by ~1k rows
            collate([train[i] for i in idx], tok.pad_token_id)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return held, peak, data


def test_resident_data_does_not_grow_with_rows(tiny_models, tmp_path):
    tok = load_tokenizer(str(tiny_models["bert"]))
    small = _cfg(tiny_models, write_csv(tmp_path / "n.csv", make_sentiment_rows(N)))
    large = _cfg(tiny_models, write_csv(tmp_path / "8n.csv", make_sentiment_rows(8 * N)))
    held_small, peak_small, _ = _held_and_epoch_peak(small, tok)
    held_large, peak_large, data = _held_and_epoch_peak(large, tok)
    assert isinstance(data["train"], ArrowFeatures)
    extra_rows = 7 * N * 0.8  # 80% of the rows train (the rest are validation/test)

    # What a list of feature dicts would hold per row: the measure below must be able to see it.
    rows = make_sentiment_rows(8 * N)
    gc.collect()
    tracemalloc.start()
    as_list = encode("classification", rows, tok, large.data, 32, ["neg", "pos"], "x")
    list_bytes_per_row = tracemalloc.get_traced_memory()[0] / len(as_list)
    tracemalloc.stop()
    del as_list
    assert list_bytes_per_row > 300  # ~8 tokens x 3 columns of Python ints

    # Held after building: the 8x larger data set costs < 2% of what lists would per extra row.
    assert held_large - held_small < 0.02 * list_bytes_per_row * extra_rows, (held_small, held_large)
    # One epoch of batches: the peak above the held data and the sampler's order is one batch, whatever
    # the size of the epoch.
    assert peak_large - peak_small < 0.05 * list_bytes_per_row * extra_rows, (peak_small, peak_large)
    assert peak_large < 0.1 * list_bytes_per_row * 8 * N


def test_arrow_features_read_back_exactly_what_encode_made(tiny_models, tmp_path):
    tok = load_tokenizer(str(tiny_models["bert"]))
    cfg = _cfg(tiny_models, write_csv(tmp_path / "d.csv", make_sentiment_rows(40)))
    cfg.data.test_fraction = cfg.data.validation_fraction = 0.0
    train = build_features(cfg, tok)["train"]
    expected = encode("classification", make_sentiment_rows(40), tok, cfg.data, 32, cfg.data.label_names, "x")
    assert [dict(f) for f in train] == expected
    assert [dict(f) for f in train[1::3]] == expected[1::3]
    assert train[-1] == expected[-1]
    assert train.lengths() == [len(f["input_ids"]) for f in expected]
