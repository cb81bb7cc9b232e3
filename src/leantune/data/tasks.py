"""From raw records to tokenised examples for each task, with one clear error per bad row.

- classification: `text_column` (+ `text_pair_column`) -> `label_column`, mapped to ids by label names;
- regression: the same inputs -> one finite number per row in `label_column` (an STS-B-like score);
- multi_label: the same inputs -> a set of labels per row (a JSON list, or a cell split on
  `data.label_separator`), encoded multi-hot over the label names;
- prompt_classification: the same rows as a prompt from `data.template`, the class scored as a label word
  by the LM head (data/prompts.py);
- causal_lm: `text_column` is the prompt, `label_column` the response (prompt tokens are masked out of
  the loss); with `label_column: null` the whole text is the target (plain language modelling);
- seq2seq: `text_column` is the source, `label_column` the target;
- reward: `chosen_column` / `rejected_column` responses, each after `prompt_column` when set (preference
  pairs for a Bradley-Terry reward model, models/reward.py);
- dpo: the same pairs as reward, each response (+ EOS) after the prompt with the prompt masked out of
  the labels, as causal-LM examples (models/dpo.py scores the response tokens);
- ppo: `text_column` prompts alone; the policy writes the responses (train/ppo.py);
- causal_lm with `data.format` alpaca / sharegpt / messages: chat records rendered with the tokenizer's
  chat template, only assistant turns in the loss (data/chat.py); `data.packing` packs them (packing.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from leantune.data.sources import Record, carve, load_source
from leantune.errors import UserError
from leantune.settings import DataConfig

IGNORE_INDEX = -100


@dataclass
class RawSplits:
    train: list[Record]
    validation: list[Record] = field(default_factory=list)
    test: list[Record] = field(default_factory=list)
    label_names: list[str] | None = None  # declared by a built-in dataset


def load_raw_splits(cfg: DataConfig) -> RawSplits:
    splits, builtin_labels = load_source(cfg.source)
    if cfg.train_split not in splits:
        raise UserError(
            f"data source {cfg.source} has no split '{cfg.train_split}' (it has: {', '.join(splits)}); "
            "set data.train_split"
        )
    train = splits[cfg.train_split]
    validation = splits.get(cfg.validation_split)
    test = splits.get(cfg.test_split)
    if test is None and cfg.test_fraction > 0:
        train, test = carve(train, cfg.test_fraction, cfg.split_seed)
    if validation is None and cfg.validation_fraction > 0:
        train, validation = carve(train, cfg.validation_fraction, cfg.split_seed + 1)
    raw = RawSplits(train, validation or [], test or [], builtin_labels)
    if cfg.max_train_samples:
        raw.train = _subsample(raw.train, cfg.max_train_samples, cfg.split_seed)
    if cfg.max_eval_samples:
        raw.validation = _subsample(raw.validation, cfg.max_eval_samples, cfg.split_seed)
        raw.test = _subsample(raw.test, cfg.max_eval_samples, cfg.split_seed)
    if not raw.train:
        raise UserError(
            f"the training split of {cfg.source} is empty; give it rows (or fix data.train_split)"
        )
    for name in (cfg.validation_split, cfg.test_split):
        if name in splits and not splits[name]:
            raise UserError(f"split '{name}' of {cfg.source} is empty; give it rows or remove it")
    return raw


def _subsample(rows: list[Record], n: int, seed: int) -> list[Record]:
    return rows if len(rows) <= n else carve(rows, n / len(rows), seed)[1]


def check_columns(rows: list[Record], cfg: DataConfig, keys: tuple[str, ...], source: str) -> None:
    present = [k for k in rows[0] if k != "_line"]
    for key in keys:
        col = getattr(cfg, key)
        if col is not None and col not in present:
            raise UserError(
                f"column '{col}' not found in {source} (columns: {', '.join(present)}); set data.{key}"
            )


#: what pandas, spreadsheets and JSON write for a missing value; as a whole cell it is never real text
MISSING_MARKERS = frozenset({"nan", "NaN", "NAN", "null", "NULL", "None", "#N/A", "N/A", "<NA>"})


def _check_present(row: Record, col: str, source: str) -> None:
    """A missing cell (empty, null, NaN, or the text 'nan' a DataFrame export writes) names its row."""
    value = row.get(col)
    where = f"{source} line {row.get('_line', '?')}"
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserError(f"{where}: empty '{col}'; fill it in or drop the row")
    if (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and value.strip() in MISSING_MARKERS
    ):
        raise UserError(
            f"{where}: '{col}' is {str(value).strip()!r}, a missing value (as pandas writes NaN); "
            "fill it in or drop the row"
        )


def _text(row: Record, col: str, source: str) -> str:
    _check_present(row, col, source)
    return str(row[col])


def label_text(raw) -> str:
    """One spelling per label: JSON's 1 and 1.0 are the same class."""
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    return "" if raw is None else str(raw).strip()


def infer_label_names(rows: list[Record], column: str) -> list[str]:
    """Sorted distinct labels; integer labels keep their numeric order (0, 1, 2, ... 10)."""
    labels = {label_text(r[column]) for r in rows if r.get(column) is not None}
    if all(_is_integer(lab) for lab in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _is_integer(text: str) -> bool:
    """'3' and '-1', not '²' or '٣' (str.isdigit accepts those, and int() then fails on some)."""
    digits = text.removeprefix("-")
    return digits.isascii() and digits.isdigit()


def label_id(row: Record, column: str, names: list[str], source: str) -> int:
    _check_present(row, column, source)
    value = label_text(row.get(column))
    if value in names:
        return names.index(value)
    if _is_integer(value) and int(value) < len(names) and not any(_is_integer(n) for n in names):
        return int(value)  # integer labels over named classes (e.g. 0/1 with [negative, positive])
    raise UserError(
        f"{source} line {row.get('_line', '?')}: label '{value}' is not one of the labels "
        f"{names}; fix the row or set data.label_names"
    )


def score_value(row: Record, column: str, source: str) -> float:
    """A regression target: a finite number (JSON number or numeric text); anything else names its row."""
    _check_present(row, column, source)
    raw = row[column]
    where = f"{source} line {row.get('_line', '?')}"
    try:
        value = float(raw.strip() if isinstance(raw, str) else raw)
        if isinstance(raw, bool):
            raise TypeError
    except (TypeError, ValueError):
        raise UserError(
            f"{where}: '{column}' is {raw!r}, not a number; task regression needs a numeric score in every "
            "row (fix the row, or set data.label_column)"
        ) from None
    if not math.isfinite(value):
        raise UserError(f"{where}: '{column}' is {raw!r}, not a finite number; fix the row or drop it")
    return value


def label_set(row: Record, column: str, separator: str | None, allow_empty: bool, source: str) -> list[str]:
    """A multi-label row's labels, deduplicated in their order: a JSON list (JSONL, or a CSV cell that
    starts with `[`), a cell split on `separator`, or one label; an empty set only where allowed."""
    raw = row.get(column)
    where = f"{source} line {row.get('_line', '?')}"
    empty = raw is None or (isinstance(raw, str) and not raw.strip())
    if not (allow_empty and empty):
        _check_present(row, column, source)
    items: list = []
    if isinstance(raw, list):
        items = raw
    elif isinstance(raw, str) and raw.strip().startswith("["):
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{where}: '{column}' is not a valid JSON list ({exc.msg}); fix the row"
            ) from None
    elif isinstance(raw, str) and separator is not None:
        items = raw.split(separator) if raw.strip() else []
    elif not empty:
        items = [raw]
    if not isinstance(items, list) or any(isinstance(i, (list, dict)) or i is None for i in items):
        raise UserError(f"{where}: '{column}' must be a list of label names; fix the row")
    labels = [label_text(i) for i in items]
    if "" in labels:
        raise UserError(f"{where}: '{column}' holds an empty label name ({raw!r}); fix the row")
    if not labels and not allow_empty:
        raise UserError(
            f"{where}: '{column}' holds no label; give every row a label, or set data.allow_empty_labels=true"
        )
    return list(dict.fromkeys(labels))


def infer_label_set_names(rows: list[Record], cfg: DataConfig, source: str) -> list[str]:
    """The sorted union of the training rows' label sets (integer names in numeric order)."""
    seen = {
        lab
        for r in rows
        for lab in label_set(r, cfg.label_column, cfg.label_separator, cfg.allow_empty_labels, source)  # type: ignore[arg-type]
    }
    if seen and all(_is_integer(lab) for lab in seen):
        return sorted(seen, key=int)
    return sorted(seen)


def multi_hot(row: Record, cfg: DataConfig, names: list[str], source: str) -> list[float]:
    labels = label_set(row, cfg.label_column, cfg.label_separator, cfg.allow_empty_labels, source)  # type: ignore[arg-type]
    unknown = [lab for lab in labels if lab not in names]
    if unknown:
        raise UserError(
            f"{source} line {row.get('_line', '?')}: label '{unknown[0]}' is not one of the labels {names}; "
            "fix the row or set data.label_names"
        )
    return [1.0 if name in labels else 0.0 for name in names]


def encode(
    task: str,
    rows: list[Record],
    tok,
    cfg: DataConfig,
    max_length: int,
    label_names: list[str] | None,
    source: str,
    prompt_kind: str = "causal",
) -> list[dict]:
    """Tokenise `rows` for `task`; the result is a list of feature dicts of int lists. `prompt_kind`
    (causal or masked: the LM head that scores the label words) matters for prompt_classification only."""
    if not rows:
        return []
    if task in ("classification", "prompt_classification", "regression", "multi_label"):
        check_columns(rows, cfg, ("text_column", "text_pair_column", "label_column"), source)
        texts = [_text(r, cfg.text_column, source) for r in rows]
        pairs = [_text(r, cfg.text_pair_column, source) for r in rows] if cfg.text_pair_column else None
        labels = head_labels(task, rows, cfg, label_names, source)
        if task == "prompt_classification":
            from leantune.data.prompts import encode_prompts

            return encode_prompts(rows, tok, cfg, max_length, labels, texts, pairs, prompt_kind)
        enc = tok(texts, pairs, truncation=True, max_length=max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        return [{**{k: enc[k][i] for k in keys}, "labels": labels[i]} for i in range(len(rows))]
    if task == "reward":
        return _preference_pairs(rows, tok, cfg, max_length, source)
    if task == "dpo":
        return _dpo_pairs(rows, tok, cfg, max_length, source)
    if task == "ppo":
        check_columns(rows, cfg, ("text_column",), source)
        prompts = [tok(_text(r, cfg.text_column, source))["input_ids"][-max_length:] for r in rows]
        return [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in prompts]
    if task == "causal_lm" and cfg.format != "text":
        from leantune.data.chat import encode_chat

        return encode_chat(rows, tok, cfg.format, cfg.system_prompt, max_length, source)
    check_columns(rows, cfg, ("text_column", "label_column"), source)
    if task == "seq2seq":
        if cfg.label_column is None:
            raise UserError("seq2seq needs a target column; set data.label_column")
        src = tok([_text(r, cfg.text_column, source) for r in rows], truncation=True, max_length=max_length)
        tgt = tok(
            text_target=[_text(r, cfg.label_column, source) for r in rows],
            truncation=True,
            max_length=max_length,
        )
        return [
            {
                "input_ids": src["input_ids"][i],
                "attention_mask": src["attention_mask"][i],
                "labels": tgt["input_ids"][i],
            }
            for i in range(len(rows))
        ]
    return [_causal_example(r, tok, cfg, max_length, source) for r in rows]


def head_labels(task: str, rows: list[Record], cfg: DataConfig, names: list[str] | None, source: str) -> list:
    """Class ids (classification), float scores (regression) or multi-hot float rows (multi_label)."""
    col: str = cfg.label_column  # type: ignore[assignment]  (config checks it is set for these tasks)
    if task == "regression":
        return [score_value(r, col, source) for r in rows]
    assert names is not None
    if task == "multi_label":
        return [multi_hot(r, cfg, names, source) for r in rows]
    return [label_id(r, col, names, source) for r in rows]


def _preference_pairs(rows: list[Record], tok, cfg: DataConfig, max_length: int, source: str) -> list[dict]:
    """Chosen and rejected token ids per pair: [prompt +] response; too long, the start is dropped (the
    reward head reads the last token, so the response's end must stay)."""
    check_columns(rows, cfg, ("chosen_column", "rejected_column", "prompt_column"), source)

    def ids(prompt: str | None, response: str) -> list[int]:
        if prompt is None:
            return tok(response)["input_ids"][-max_length:]
        both = tok(prompt)["input_ids"] + tok(response, add_special_tokens=False)["input_ids"]
        return both[-max_length:]

    out = []
    for r in rows:
        prompt = _text(r, cfg.prompt_column, source) if cfg.prompt_column else None
        chosen = ids(prompt, _text(r, cfg.chosen_column, source))
        rejected = ids(prompt, _text(r, cfg.rejected_column, source))
        out.append(
            {
                "input_ids": chosen,
                "attention_mask": [1] * len(chosen),
                "rejected_input_ids": rejected,
                "rejected_attention_mask": [1] * len(rejected),
            }
        )
    return out


def _dpo_pairs(rows: list[Record], tok, cfg: DataConfig, max_length: int, source: str) -> list[dict]:
    """Chosen and rejected causal-LM examples (prompt masked) side by side: `rejected_*` keys."""
    check_columns(rows, cfg, ("chosen_column", "rejected_column", "prompt_column"), source)
    out = []
    for r in rows:
        prompt = tok(_text(r, cfg.prompt_column, source) if cfg.prompt_column else "")["input_ids"]
        pair = []
        for col in (cfg.chosen_column, cfg.rejected_column):
            response = tok(_text(r, col, source), add_special_tokens=False)["input_ids"]
            pair.append(_prompt_and_target(prompt, response, tok.eos_token_id, max_length))
        chosen, rejected = pair
        out.append({**chosen, **{f"rejected_{k}": v for k, v in rejected.items()}})
    return out


def _causal_example(row: Record, tok, cfg: DataConfig, max_length: int, source: str) -> dict:
    """Prompt + response + EOS; too long, the prompt loses its *start*, so the target is always learnt."""
    prompt = tok(_text(row, cfg.text_column, source))["input_ids"]
    if cfg.label_column is None:
        ids = (prompt + [tok.eos_token_id])[:max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}
    response = tok(_text(row, cfg.label_column, source), add_special_tokens=False)["input_ids"]
    return _prompt_and_target(prompt, response, tok.eos_token_id, max_length)


def _prompt_and_target(prompt: list[int], response: list[int], eos: int, max_length: int) -> dict:
    """One causal-LM example: prompt (masked) + response + EOS, the prompt cut from its start to fit."""
    target = (response + [eos])[: max_length - 1]  # keep at least one prompt token
    prompt = (
        prompt[len(prompt) + len(target) - max_length :] if len(prompt) + len(target) > max_length else prompt
    )
    ids = prompt + target
    labels = [IGNORE_INDEX] * len(prompt) + target
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


class Batch(dict):
    """A collated batch of tensors; `tokens` counts its real (not padding) tokens."""

    tokens: int = 0


def collate(features: list[dict], pad_id: int) -> Batch:
    """Pad to the longest example in the batch (dynamic padding): ids with `pad_id`, labels with -100.

    Packed rows (they carry `position_ids`, data/packing.py) get a 4-D block-diagonal causal mask.
    """
    import torch

    batch = Batch()
    batch.tokens = sum(len(f["input_ids"]) for f in features)
    for key in features[0]:
        values = [f[key] for f in features]
        if not isinstance(values[0], list):
            batch[key] = torch.tensor(values)
            continue
        width = max(len(v) for v in values)
        fill = {
            "input_ids": pad_id,
            "rejected_input_ids": pad_id,
            "labels": IGNORE_INDEX,
            "rejected_labels": IGNORE_INDEX,
        }.get(key, 0)
        batch[key] = torch.tensor([v + [fill] * (width - len(v)) for v in values])
    if "position_ids" in batch:
        from leantune.data.packing import packed_attention_mask

        batch["attention_mask"] = packed_attention_mask(batch["position_ids"])
    return batch
