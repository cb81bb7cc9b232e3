"""Generation-based evaluation for seq2seq and causal-LM SFT: decode, then BLEU, chrF, ROUGE, exact match,
and, where the references are a small set of class labels, accuracy and precision/recall/F1 of the answers.

Loss and perplexity say how likely the reference is; they do not say what the model writes. The papers
we compare with (T5 on translation, seed 001 Table 2) report corpus BLEU and ROUGE of greedy/beam output,
so this module generates and scores with sacrebleu and rouge-score directly (`evaluate.load` needs the
hub, which our machines cannot reach).

References are the raw text of the data, not a decode of its tokens: an uncased tokenizer would
otherwise lowercase the references and flatter the scores. Causal LMs generate from the prompt alone
(left padding, so every row continues right after its own last token) and the prompt is cut off the
output. Each rank generates for its own share of rows; the texts are gathered so every rank computes the
same metrics (they can select the best checkpoint).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from leantune.data.sources import Record


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu, 0-100), mean ROUGE-1/2/L F1 (stemmed, 0-1) and exact match (0-1)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {}
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rouge = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, ref in zip(predictions, references, strict=True):
        for key, score in scorer.score(ref, pred).items():
            rouge[key] += score.fmeasure
    n = len(predictions)
    return {
        "bleu": float(sacrebleu.corpus_bleu(predictions, [references]).score),
        "chrf": float(sacrebleu.corpus_chrf(predictions, [references]).score),
        **{k: v / n for k, v in rouge.items()},
        "exact_match": sum(_norm(p) == _norm(r) for p, r in zip(predictions, references, strict=True)) / n,
    }


def _norm(text: str) -> str:
    return " ".join(text.split())


#: references with at most this many distinct answers (and at most half as many as rows) are labels
MAX_ANSWER_LABELS = 20
OTHER = "<other>"


def _answer(text: str) -> str:
    """An answer as a label: the first line, lower-cased, without surrounding spaces and punctuation."""
    first = text.strip().split("\n", 1)[0] if text.strip() else ""
    return " ".join(first.lower().split()).strip(" .,:;!?\"'")


def answer_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Accuracy and macro precision/recall/F1 (scikit-learn) when the references are class labels
    ("positive"/"negative", "yes"/"no", "A".."D"): a generative run on a classification-style task is
    then scored like a classifier. A prediction counts as the label it equals or starts with (the
    longest such label: "positive, because ..." is "positive"); one matching no label is `<other>`,
    wrong for every class (`unmatched_answers` is their share). Free-text references: {}."""
    from sklearn.metrics import precision_recall_fscore_support

    refs = [_answer(r) for r in references]
    labels = sorted(set(refs))
    if not refs or len(labels) > min(MAX_ANSWER_LABELS, len(refs) // 2) or "" in labels:
        return {}
    by_length = sorted(labels, key=len, reverse=True)

    def as_label(text: str) -> str:
        answer = _answer(text)
        return next((lab for lab in by_length if re.match(rf"{re.escape(lab)}(?!\w)", answer)), OTHER)

    preds = [as_label(p) for p in predictions]
    p, r, f1, _ = precision_recall_fscore_support(
        refs, preds, labels=labels, average="macro", zero_division=0
    )
    n = len(refs)
    return {
        "accuracy": sum(a == b for a, b in zip(preds, refs, strict=True)) / n,
        "f1": float(f1),
        "precision": float(p),
        "recall": float(r),
        "unmatched_answers": preds.count(OTHER) / n,
    }


def prompt_ids(tok, text: str, task: str, max_length: int) -> list[int]:
    """The model input, tokenised as in training (data/tasks.py); a long causal prompt keeps its end."""
    if task == "seq2seq":
        return tok(text, truncation=True, max_length=max_length)["input_ids"]
    return tok(text)["input_ids"][-max_length:]


def _padded(rows: list[list[int]], pad_id: int, left: bool):
    """Decoders continue from the last column, so their prompts are left-padded; encoders as in training."""
    import torch

    width = max(len(r) for r in rows)
    ids, mask = [], []
    for r in rows:
        fill = width - len(r)
        ids.append([pad_id] * fill + r if left else r + [pad_id] * fill)
        mask.append([0] * fill + [1] * len(r) if left else [1] * len(r) + [0] * fill)
    return torch.tensor(ids), torch.tensor(mask)


def generate_texts(
    model,
    tok,
    sources: list[str],
    task: str,
    max_length: int,
    max_new_tokens: int,
    num_beams: int = 1,
    batch_size: int = 16,
) -> list[str]:
    """Greedy (or beam) continuations of `sources`, decoded without special tokens and stripped."""
    encoded = [prompt_ids(tok, s, task, max_length) for s in sources]
    return generate_from_ids(model, tok, encoded, task, max_new_tokens, num_beams, batch_size)


def generate_from_ids(
    model,
    tok,
    encoded: list[list[int]],
    task: str,
    max_new_tokens: int,
    num_beams: int = 1,
    batch_size: int = 16,
    sampling: dict | None = None,
    progress: bool = False,
) -> list[str]:
    """Continuations of tokenised prompts: greedy/beam, or sampled with `sampling` (temperature, top_p:
    the caller seeds torch); a progress bar on stderr with `progress` and more than one batch."""
    import torch
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tok.pad_token_id
    # Longest first: similar lengths share a batch (less padding), and memory trouble shows at once.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    out: list[str] = [""] * len(encoded)
    decoding = {"do_sample": True, **sampling} if sampling else {"do_sample": False, "num_beams": num_beams}
    starts = range(0, len(order), batch_size)
    bar = tqdm(starts, desc="generate", unit="batch", leave=False, disable=not progress or len(starts) < 2)
    with torch.no_grad():
        for start in bar:
            idx = order[start : start + batch_size]
            ids, mask = _padded([encoded[i] for i in idx], pad_id, left=task != "seq2seq")
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=tok.eos_token_id,
                **decoding,
            )
            if task != "seq2seq":  # a decoder returns prompt + continuation: keep the continuation
                generated = generated[:, ids.shape[1] :]
            for i, text in zip(idx, tok.batch_decode(generated, skip_special_tokens=True), strict=True):
                out[i] = text.strip()
    model.train(was_training)
    return out


def generation_eval(
    model,
    tok,
    rows: list[Record],
    source_column: str,
    target_column: str,
    task: str,
    max_length: int,
    max_new_tokens: int,
    num_beams: int,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
) -> tuple[dict[str, float], list[dict]]:
    """Generate for `rows` (sharded over ranks, gathered), score; return metrics and one record per row."""
    sources = [str(r[source_column]) for r in rows]
    references = [str(r[target_column]) for r in rows]
    mine = list(range(len(rows)))[rank::world]
    texts = generate_texts(
        model, tok, [sources[i] for i in mine], task, max_length, max_new_tokens, num_beams, batch_size
    )
    pairs = list(zip(mine, texts, strict=True))
    if world > 1:
        from accelerate.utils import gather_object

        pairs = gather_object(pairs)
    predictions = [""] * len(rows)
    for i, text in pairs:
        predictions[i] = text
    records = [
        {"source": s, "reference": r, "prediction": p}
        for s, r, p in zip(sources, references, predictions, strict=True)
    ]
    return {**text_metrics(predictions, references), **answer_metrics(predictions, references)}, records


def run_generation_eval(cfg, tok, model, rows: list[Record], rank: int = 0, world: int = 1, data_cfg=None):
    """`generation_eval` over `rows` with the run's generation settings: (metrics, prediction records).

    `data_cfg` names the columns when the rows come from other data than the run's (`leantune eval --data`).
    """
    ec, data_cfg = cfg.eval, data_cfg or cfg.data
    return generation_eval(
        model,
        tok,
        rows,
        data_cfg.text_column,
        data_cfg.label_column,
        cfg.task,
        cfg.model.max_length,
        ec.max_new_tokens,
        ec.num_beams,
        ec.batch_size,
        rank,
        world,
    )


def generation_evaluator(cfg, tok, rows: list[Record], rank: int, world: int) -> Callable[[object], dict]:
    """`model -> metrics` over `rows` with the run's generation settings (the trainer's validation hook)."""

    def run(model) -> dict:
        return run_generation_eval(cfg, tok, model, rows, rank, world)[0] if rows else {}

    return run


def generation_rows(cfg) -> dict[str, list[Record]]:
    """The raw validation/test rows (the same seeded split as training) that generation scores against."""
    from leantune.data.tasks import load_raw_splits

    raw = load_raw_splits(cfg.data)
    n = cfg.eval.max_generate_samples
    return {split: getattr(raw, split)[:n] if n else getattr(raw, split) for split in ("validation", "test")}


def write_predictions(path, records: list[dict]) -> None:
    import json

    from leantune.atomic import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
