"""`leantune predict RUN_DIR data.csv --out predictions.csv`: label new text with a classification run.

Each input row (CSV, TSV or JSONL, with the run's `data.text_column` and, for pair tasks, its
`text_pair_column`) is written back with `prediction` (the label name of the arg-max class) and one
`prob_<label>` column per class (softmax of the logits). Rows that also carry the run's label column are
scored: the accuracy is printed (the same number `leantune eval RUN_DIR --data FILE` reports). The
output (.csv or .jsonl, by its suffix) is written atomically and never overwrites a file.
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


def run_predict(run_dir: Path, data: Path, out: Path, batch_size: int | None = None) -> dict:
    from leantune.data.sources import read_table
    from leantune.data.tasks import _text, check_columns, label_id

    if out.suffix not in OUT_SUFFIXES:
        raise UserError(f"--out {out} must end in .csv or .jsonl")
    check_new_file(out, "--out")
    cfg = load_run_config(run_dir)
    if cfg.task != "classification":
        raise UserError(f"{run_dir} is a {cfg.task} run; predict labels text with a classification run")
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
    gold = [label_id(r, dc.label_column, names, source) for r in rows] if scored else None
    setup_torch(cfg.train.seed, cfg.train.num_threads)
    import torch
    from tqdm.auto import tqdm

    from leantune.data.tasks import collate
    from leantune.models.loader import load_tokenizer

    tok = load_tokenizer(str(run_dir / "model"))
    model = load_trained_model(run_dir, cfg).eval()
    size = batch_size or cfg.eval.batch_size
    probs: list[list[float]] = []
    starts = range(0, len(rows), size)
    with torch.no_grad():
        for start in tqdm(starts, desc="predict", unit="batch", leave=False, disable=len(starts) < 20):
            chunk = slice(start, start + size)
            enc = tok(
                texts[chunk],
                pairs[chunk] if pairs else None,
                truncation=True,
                max_length=cfg.model.max_length,
            )
            keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
            feats = [{k: enc[k][i] for k in keys} for i in range(len(enc["input_ids"]))]
            logits = model(**collate(feats, tok.pad_token_id)).logits
            probs += torch.softmax(logits.float(), dim=-1).tolist()
    preds = [max(range(len(p)), key=p.__getitem__) for p in probs]
    records = [
        {
            **{k: v for k, v in row.items() if k != "_line"},
            "prediction": names[pred],
            **{f"prob_{name}": round(p[i], 6) for i, name in enumerate(names)},
        }
        for row, pred, p in zip(rows, preds, probs, strict=True)
    ]
    from leantune.recipes.common import write_new_output

    out.parent.mkdir(parents=True, exist_ok=True)
    write_new_output(out, _table_text(records, out.suffix))
    result: dict = {"n": len(rows), "predictions": preds, "out": str(out)}
    if gold is not None:
        result["accuracy"] = sum(p == g for p, g in zip(preds, gold, strict=True)) / len(rows)
    line = f"leantune: {len(rows)} predictions written to {out}"
    print(line + (f"; accuracy {result['accuracy']:.4f}" if "accuracy" in result else ""))
    return result


def _table_text(records: list[dict], suffix: str) -> str:
    if suffix == ".jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue()
