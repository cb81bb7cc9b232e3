"""`leantune eval RUN_DIR --data SOURCE`: score a finished run on another dataset.

A file passed with --data is used whole; a built-in or `hf:` source gives its `--split` (test by default,
carved with the run's split seed exactly as in training). Labels map through the run's label names, so a
label the model was not trained on is an error with its line number, not a silent wrong answer.
"""

from __future__ import annotations

from pathlib import Path

from leantune.errors import UserError
from leantune.recipes.common import format_table, load_run_config, load_trained_model, setup_torch


def run_eval(run_dir: Path, source: str | None, split: str = "test", out_json: Path | None = None) -> dict:
    from leantune.data.tasks import encode, load_raw_splits

    cfg = load_run_config(run_dir)
    if out_json is not None and out_json.exists():
        raise UserError(f"{out_json} already exists; choose another --out")
    is_file = (
        source is not None
        and not source.startswith(("builtin:", "hf:"))
        and Path(source).expanduser().is_file()
    )  # load_source expands ~ too
    data_cfg = cfg.data.model_copy(update={"source": source or cfg.data.source})
    if is_file:
        # a file is one split named "train"; the run's split names and subsampling are about training
        data_cfg = data_cfg.model_copy(
            update={
                "validation_fraction": 0.0,
                "test_fraction": 0.0,
                "train_split": "train",
                "max_train_samples": None,
            }
        )
        split = "train"  # a single file is one split; use all of it
    if split not in ("train", "validation", "test"):
        raise UserError(f"--split must be train, validation or test, not '{split}'")
    raw = load_raw_splits(data_cfg)
    rows = getattr(raw, split)
    if not rows:
        raise UserError(f"split '{split}' of {data_cfg.source} is empty; pick another --split")
    setup_torch(cfg.train.seed, cfg.train.num_threads)
    from leantune.eval.loop import evaluate
    from leantune.models.loader import load_tokenizer

    tok = load_tokenizer(str(run_dir / "model"))
    features = encode(
        cfg.task, rows, tok, data_cfg, cfg.model.max_length, cfg.data.label_names, data_cfg.source
    )
    model = load_trained_model(run_dir, cfg)
    metrics = evaluate(
        model,
        features,
        cfg.task,
        cfg.eval.batch_size,
        tok.pad_token_id,
        num_labels=len(cfg.data.label_names or []),
    )
    result = {"run_dir": str(run_dir), "data": data_cfg.source, "split": split, "n": len(features), **metrics}
    if out_json is not None:
        from leantune.atomic import write_json_atomic

        out_json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_json, result)
    print(
        format_table(
            [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in result.items()], "leantune eval"
        )
    )
    return result
