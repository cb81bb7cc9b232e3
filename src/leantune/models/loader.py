"""Load a tokenizer and a task model from `embedded:<name>`, a local HF folder, or a hub id."""

from __future__ import annotations

import os
from pathlib import Path

from leantune.errors import UserError
from leantune.models.embedded import embedded_model_dir

_AUTO_CLASS = {
    "classification": "AutoModelForSequenceClassification",
    "causal_lm": "AutoModelForCausalLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
}


def resolve_model_path(name: str) -> str:
    """A local folder for embedded/local models; the hub id unchanged otherwise (checked when loading)."""
    if name.startswith("embedded:"):
        return str(embedded_model_dir(name.split(":", 1)[1]))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json; point model.name at a HF model folder")
        return str(path)
    # Hub ids are `name` or `org/name` (dots allowed: Qwen/Qwen2.5-0.5B); anything else is a path.
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise UserError(f"model path not found: {name}; set model.name to an existing folder or a hub id")
    return name


def _from_pretrained(loader, name: str, **kwargs):
    try:
        return loader.from_pretrained(name, **kwargs)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        why = "the hub is offline (HF_HUB_OFFLINE=1)" if offline else str(exc).splitlines()[0]
        raise UserError(
            f"cannot load model '{name}': not a local folder and {why}; "
            "set model.name to a local HF folder or embedded:minilm"
        ) from None


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = name if Path(name).is_dir() else resolve_model_path(name)  # adapter folders have no config.json
    tok = _from_pretrained(AutoTokenizer, path)
    if tok.eos_token is None and tok.sep_token is not None:
        # a WordPiece vocabulary (BERT-style) ends a sequence with [SEP]; causal LM examples need an end
        # token, and a tokenizer without one would give None ids (the tiny test models borrow this vocab)
        tok.eos_token = tok.sep_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.sep_token
    return tok


def load_model(
    name: str,
    task: str,
    dtype: str = "float32",
    label_names: list[str] | None = None,
    pad_token_id: int | None = None,
):
    """The task model; `pad_token_id` (the tokenizer's) fills a config without one (GPT-2 style)."""
    import torch
    import transformers

    path = resolve_model_path(name)
    kwargs: dict = {"dtype": getattr(torch, dtype)}
    if task == "classification":
        names = label_names or ["0", "1"]
        kwargs |= {
            "num_labels": len(names),
            "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)},
            "ignore_mismatched_sizes": True,  # a fine-tuned classifier with another label count: new head
        }
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the "LOAD REPORT" on a new head is expected
    transformers.logging.disable_progress_bar()  # a bar for a 1-second load is noise
    try:
        model = _from_pretrained(getattr(transformers, _AUTO_CLASS[task]), path, **kwargs)
    except ValueError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"model '{name}' cannot be used for task '{task}': {first}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = (
            pad_token_id if pad_token_id is not None else load_tokenizer(name).pad_token_id
        )
    return model
