"""`leantune predict RUN_DIR data.csv --out predictions.csv`: label or score new text with a
classification, prompt-classification, multi-label or regression run.

Each input row (CSV, TSV or JSONL, with the run's `data.text_column` and, for pair tasks, its
`text_pair_column`) is written back with `prediction` and, for classifiers, one `prob_<label>` column per
class: classification predicts the label name of the arg-max class (softmax probabilities);
prompt_classification the same over its label words' scores (each row rendered with the run's
`data.template` and scored by the LM head at the label slot, models/prompt_head.py: the logits `leantune
eval` takes the arg-max of); multi-label
the set of labels whose sigmoid is >= `eval.threshold` (a list in JSONL; in CSV a JSON list, or the
labels joined with the run's `data.label_separator`); regression the score itself. Rows that also carry
the run's label column are scored: accuracy, micro F1 or MSE is printed (the numbers `leantune eval
RUN_DIR --data FILE` reports). The output (.csv or .jsonl, by its suffix) is written atomically and never
overwrites a file.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from leantune.errors import UserError
from leantune.outputs import check_new_file
from leantune.recipes.common import load_run_config, load_trained_model, setup_torch

OUT_SUFFIXES = (".csv", ".jsonl")
PREDICT_TASKS = ("classification", "prompt_classification", "multi_label", "regression")


def run_predict(run_dir: Path, data: Path, out: Path, batch_size: int | None = None) -> dict:
    from leantune.data.sources import read_table
    from leantune.data.tasks import _text, check_columns, head_labels

    if out.suffix not in OUT_SUFFIXES:
        raise UserError(f"--out {out} must end in .csv or .jsonl")
    check_new_file(out, "--out")
    cfg = load_run_config(run_dir)
    if cfg.task not in PREDICT_TASKS:
        raise UserError(
            f"{run_dir} is a {cfg.task} run; predict labels text with a classification, "
            "prompt_classification, multi_label or regression run (use `leantune generate` for text)"
        )
    if data.suffix not in (".csv", ".tsv", ".jsonl"):
        raise UserError(f"predict reads a .csv, .tsv or .jsonl file, not {data}")
    rows = read_table(data)
    if not rows:
        raise UserError(f"{data} holds no rows; give it a header and rows to label")
    dc, source = cfg.data, str(data)
    check_columns(rows, dc, ("text_column", "text_pair_column"), source)
    texts = [_text(r, dc.text_column, source) for r in rows]
    pairs = [_text(r, dc.text_pair_column, source) for r in rows] if dc.text_pair_column else None
    names = list(dc.label_names or [])
    scored = dc.label_column is not None and dc.label_column in rows[0]
    gold = head_labels(cfg.task, rows, dc, names, source) if scored else None
    setup_torch(cfg.train.seed, cfg.train.num_threads)
    import torch
    from tqdm.auto import tqdm

    from leantune.data.tasks import collate
    from leantune.models.loader import load_tokenizer

    tok = load_tokenizer(str(run_dir / "model"))
    feats = _features(cfg, tok, rows, texts, pairs)
    model = load_trained_model(run_dir, cfg).eval()
    size = batch_size or cfg.eval.batch_size
    probs: list[list[float]] = []
    starts = range(0, len(rows), size)
    with torch.no_grad():
        for start in tqdm(starts, desc="predict", unit="batch", leave=False, disable=len(starts) < 20):
            logits = model(**collate(feats[start : start + size], tok.pad_token_id)).logits.float()
            probs += _outputs(cfg.task, logits).tolist()
    preds, shown = _predictions(cfg, probs, out.suffix)
    columns = [] if cfg.task == "regression" else names  # a score has no per-class probabilities
    records = [
        {
            **{k: v for k, v in row.items() if k != "_line"},
            "prediction": show,
            **{f"prob_{n}": round(p[i], 6) for i, n in enumerate(columns)},
        }
        for row, show, p in zip(rows, shown, probs, strict=True)
    ]
    from leantune.recipes.common import write_new_output

    out.parent.mkdir(parents=True, exist_ok=True)
    write_new_output(out, _table_text(records, out.suffix))
    result: dict = {"n": len(rows), "predictions": preds, "out": str(out)}
    if gold is not None:
        result |= _score(cfg, probs, preds, gold)
    line = f"leantune: {len(rows)} predictions written to {out}"
    print(line + "".join(f"; {k} {v:.4f}" for k, v in result.items() if k in SCORE_KEYS))
    return result


def _features(cfg, tok, rows: list, texts: list[str], pairs: list[str] | None) -> list[dict]:
    """Model inputs per row, without labels (the rows need none): the tokenised text (pair), or for
    prompt_classification the rendered prompt and its `label_position`, encoded as training and `leantune
    eval` encode it (data/prompts.py)."""
    if cfg.task == "prompt_classification":
        from leantune.data.prompts import encode_prompts
        from leantune.models.prompt_head import kind_of_model

        kind = kind_of_model(cfg.model.name)
        zeros = [0] * len(rows)
        feats = encode_prompts(rows, tok, cfg.data, cfg.model.max_length, zeros, texts, pairs, kind)
        return [{k: v for k, v in f.items() if k != "labels"} for f in feats]
    enc = tok(texts, pairs, truncation=True, max_length=cfg.model.max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(rows))]


#: the number each task's predict prints when the rows carry labels
SCORE_KEYS = ("accuracy", "micro_f1", "subset_accuracy", "mse", "pearson")


def _outputs(task: str, logits):
    """Softmax probabilities (classification), per-label sigmoids (multi-label) or the score."""
    import torch

    if task == "multi_label":
        return torch.sigmoid(logits)
    if task == "regression":
        return logits[:, :1]
    return torch.softmax(logits, dim=-1)


def _predictions(cfg, probs: list[list[float]], suffix: str) -> tuple[list, list]:
    """What `predictions` returns (class ids, label-name lists, scores) and what the file shows."""
    names = list(cfg.data.label_names or [])
    if cfg.task == "regression":
        scores = [p[0] for p in probs]
        return scores, [round(v, 6) for v in scores]
    if cfg.task == "multi_label":
        sets = [[n for n, q in zip(names, p, strict=True) if q >= cfg.eval.threshold] for p in probs]
        sep = cfg.data.label_separator
        if suffix == ".jsonl":
            return sets, sets
        return sets, [sep.join(s) if sep else json.dumps(s, ensure_ascii=False) for s in sets]
    ids = [max(range(len(p)), key=p.__getitem__) for p in probs]
    return ids, [names[i] for i in ids]


def _score(cfg, probs: list[list[float]], preds: list, gold: list) -> dict[str, float]:
    """The same metrics `leantune eval` reports, for rows that carried labels."""
    if cfg.task == "regression":
        from leantune.eval.metrics import regression_metrics

        return regression_metrics(preds, gold)
    if cfg.task == "multi_label":
        from leantune.eval.metrics import multi_label_metrics

        return multi_label_metrics(probs, gold, list(cfg.data.label_names or []), cfg.eval.threshold)
    return {"accuracy": sum(p == g for p, g in zip(preds, gold, strict=True)) / len(gold)}


def _table_text(records: list[dict], suffix: str) -> str:
    if suffix == ".jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue()
