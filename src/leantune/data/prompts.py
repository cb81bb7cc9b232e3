"""Prompt-style classification (task `prompt_classification`): each example becomes a prompt from
`data.template`, and its class is read off the language-model head as the score of one label word per
class at the `{mask}` slot, not from a freshly initialised classifier head.

Why: MeZO (Malladi et al. 2023) only learns in a few thousand steps from the pretrained LM head's prior
(its Table 1 uses templates such as "<S> It was [MASK] ." with the words great/terrible); a random head
gives the zeroth-order estimate nothing to start from. It also suits any method on a causal LM.

- causal LM: the prompt is the template up to `{mask}` (anything after `{mask}` must be blank); the score
  is the next-token logit after the prompt's last token;
- masked LM: the whole template, `{mask}` replaced by the tokenizer's mask token; the score is the
  mask position's logit.

Each feature carries `label_position` (the token whose logits are read); models/prompt_head.py turns the
LM's logits there into (batch, classes) logits and the cross-entropy loss.
"""

from __future__ import annotations

import string

from leantune.data.sources import Record
from leantune.errors import UserError
from leantune.settings import DataConfig

PLACEHOLDERS = ("text", "text_pair", "mask")


def check_template(template: str, has_pair: bool) -> None:
    """`{text}` once, `{mask}` once, `{text_pair}` exactly when a pair column is set (ValueError: the
    config validator turns it into one line)."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ValueError(
            f"data.template {template!r} is not a valid template ({exc}); write e.g. "
            "'{text} It was {mask}'"
        ) from None
    unknown = sorted({f for f in fields if f not in PLACEHOLDERS})
    if unknown:
        raise ValueError(
            f"data.template has unknown placeholder {{{unknown[0]}}}; use {{text}}, {{text_pair}}, {{mask}}"
        )
    for name in ("text", "mask"):
        if fields.count(name) != 1:
            raise ValueError(
                f"data.template needs {{{name}}} exactly once (has {fields.count(name)}); e.g. "
                "'{text} It was {mask}'"
            )
    if has_pair != ("text_pair" in fields):
        raise ValueError(
            "data.template must hold {text_pair} when data.text_pair_column is set, and only then"
        )


def _render(template: str, text: str, pair: str | None, mask: str) -> str:
    values = {"text": text, "mask": mask}
    if pair is not None:
        values["text_pair"] = pair
    return template.format(**values)


def label_word_ids(tok, cfg: DataConfig, label_names: list[str]) -> tuple[list[int], list[str]]:
    """One vocabulary id per class (the token a label word starts with after a space), and notes for the
    summary: which words were cut to their first token (`label_word_tokens: first`).

    A word that is several tokens is refused with `single` (the default); two classes whose words share a
    first token are always refused (they could not be told apart)."""
    words = cfg.label_words if cfg.label_words is not None else list(label_names)
    if len(words) != len(label_names):
        raise UserError(
            f"data.label_words has {len(words)} words for {len(label_names)} classes {label_names}; "
            "give one word per class, in label order"
        )
    ids, notes = [], []
    for word in words:
        pieces = _word_tokens(tok, word)
        if not pieces:
            raise UserError(f"label word {word!r} encodes to no token; pick another data.label_words entry")
        if len(pieces) > 1:
            shown = tok.convert_ids_to_tokens(pieces)
            if cfg.label_word_tokens == "single":
                raise UserError(
                    f"label word {word!r} is {len(pieces)} tokens {shown} for this tokenizer; pick a "
                    "one-token word in data.label_words, or set data.label_word_tokens=first"
                )
            notes.append(f"label word {word!r} is {len(pieces)} tokens {shown}: scored by its first")
        ids.append(pieces[0])
    if len(set(ids)) < len(ids):
        raise UserError(
            f"label words {words} share a first token; pick words that start differently (data.label_words)"
        )
    return ids, notes


def _word_tokens(tok, word: str) -> list[int]:
    """The ids of `word` as it follows the prompt's last word: after a space (byte-level BPE spells
    ' great' as one token, 'great' as another); a lone leading space token (SentencePiece) is dropped."""
    ids = tok(" " + word.strip(), add_special_tokens=False)["input_ids"]
    if len(ids) > 1 and not tok.decode(ids[:1]).strip():
        ids = ids[1:]
    return ids


def encode_prompts(
    rows: list[Record],
    tok,
    cfg: DataConfig,
    max_length: int,
    labels: list[int],
    texts: list[str],
    pairs: list[str] | None,
    kind: str,
) -> list[dict]:
    """Features for each row: ids, mask, the class id and `label_position`. A long text loses its end
    (the template around it, and so the scored slot, always stays)."""
    out = []
    for i, text in enumerate(texts):
        pair = pairs[i] if pairs is not None else None
        ids, position = _prompt_ids(tok, cfg.template, text, pair, kind)
        excess = len(ids) - max_length
        if excess > 0:
            text = _shorten(tok, text, excess)
            ids, position = _prompt_ids(tok, cfg.template, text, pair, kind)
            if len(ids) > max_length:
                raise UserError(
                    f"data.template alone is {len(ids)} tokens with this text, over model.max_length="
                    f"{max_length}; shorten the template or raise model.max_length"
                )
        out.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * len(ids),
                "labels": labels[i],
                "label_position": position,
            }
        )
    return out


def _shorten(tok, text: str, excess: int) -> str:
    """`text` without its last `excess` (+ a margin for re-tokenisation) tokens."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return tok.decode(ids[: max(0, len(ids) - excess - 2)])


def _prompt_ids(tok, template: str, text: str, pair: str | None, kind: str) -> tuple[list[int], int]:
    if kind == "masked":
        if tok.mask_token_id is None:
            raise UserError(
                "this masked LM's tokenizer has no mask token; use a causal LM for the prompt task"
            )
        ids = tok(_render(template, text, pair, tok.mask_token))["input_ids"]
        return ids, ids.index(tok.mask_token_id)
    head, _, tail = template.partition("{mask}")
    if tail.strip():
        raise UserError(
            f"data.template {template!r} has text after {{mask}}; a causal LM scores the next token, so "
            "end the template with {mask}"
        )
    prompt = _render(head + "{mask}", text, pair, "").rstrip()
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id
    if bos is not None and tok("a")["input_ids"][:1] == [bos]:  # the tokenizer starts sequences with BOS
        ids = [bos, *ids]
    return ids, len(ids) - 1
