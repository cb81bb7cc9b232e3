"""Tokenised features of a run's data, built the same way for `leantune train`, `leantune plan` and the
HF baseline (`leantune.recipes.train` re-exports `build_features`)."""

from __future__ import annotations

from leantune.config import Config


def build_features(cfg: Config, tok) -> dict[str, list[dict]]:
    """Tokenised train/validation/test examples; fills in inferred label names (shared with baselines).

    With `data.packing` the training split holds packed rows (data/packing.py), validation and test
    keep one example per row. Each split is a memory-mapped Arrow file (`ArrowFeatures`), so what
    stays resident does not grow with the number of examples; the raw records are dropped when this
    returns.
    """
    from leantune.data.arrow_features import write_features
    from leantune.data.tasks import (
        check_columns,
        encode,
        infer_label_names,
        infer_label_set_names,
        load_raw_splits,
    )

    raw = load_raw_splits(cfg.data)
    if cfg.task in ("classification", "prompt_classification") and cfg.data.label_names is None:
        check_columns(raw.train, cfg.data, ("label_column",), cfg.data.source)
        cfg.data.label_names = raw.label_names or infer_label_names(raw.train, cfg.data.label_column)
    if cfg.task == "multi_label" and cfg.data.label_names is None:
        check_columns(raw.train, cfg.data, ("label_column",), cfg.data.source)
        source = f"{cfg.data.source} [train]"
        cfg.data.label_names = raw.label_names or infer_label_set_names(raw.train, cfg.data, source)

    kind = "causal"
    if cfg.task == "prompt_classification":
        from leantune.data.prompts import label_word_ids
        from leantune.models.prompt_head import kind_of_model

        kind = kind_of_model(cfg.model.name)
        label_word_ids(tok, cfg.data, list(cfg.data.label_names or []))  # bad words: refused before encoding

    def encode_split(rows, split: str) -> list[dict]:
        features = encode(
            cfg.task,
            rows,
            tok,
            cfg.data,
            cfg.model.max_length,
            cfg.data.label_names,
            f"{cfg.data.source} [{split}]",
            kind,
        )
        if cfg.data.packing and split == "train":  # evaluation scores each example alone (same loss)
            from leantune.data.packing import pack

            return pack(features, cfg.model.max_length)
        return features

    return {
        split: write_features(lambda rows, split=split: encode_split(rows, split), getattr(raw, split))
        for split in ("train", "validation", "test")
    }
