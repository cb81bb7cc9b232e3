"""Load a tokenizer and a task model from `embedded:<name>`, a local HF folder, or a hub id."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from leantune.errors import UserError
from leantune.models.embedded import embedded_model_dir

_AUTO_CLASS = {
    "classification": "AutoModelForSequenceClassification",
    "regression": "AutoModelForSequenceClassification",  # one output, MSE (problem_type regression)
    "multi_label": "AutoModelForSequenceClassification",  # one logit per label, BCE with logits
    "causal_lm": "AutoModelForCausalLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "reward": "AutoModelForSequenceClassification",  # one output: the reward (models/reward.py)
    "dpo": "AutoModelForCausalLM",  # the policy (models/dpo.py)
    "ppo": "AutoModelForCausalLM",  # the policy; its value head is added by train/ppo.py
}
#: prompt_classification: the LM whose head scores the label words (models/prompt_head.py)
_PROMPT_CLASS = {"causal": "AutoModelForCausalLM", "masked": "AutoModelForMaskedLM"}


def resolve_model_path(name: str) -> str:
    """A local folder for embedded/local models; the hub id unchanged otherwise (checked when loading)."""
    if name.startswith("embedded:"):
        return str(embedded_model_dir(name.split(":", 1)[1]))
    path = Path(name).expanduser()
    if path.is_dir():
        check_model_folder(path)
        return str(path)
    if path.is_file():
        raise UserError(f"model.name {name} is a file; point it at the model's folder (config.json, weights)")
    # Hub ids are `name` or `org/name` (dots allowed: Qwen/Qwen2.5-0.5B); anything else is a path.
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise UserError(f"model path not found: {name}; set model.name to an existing folder or a hub id")
    return name


#: files one of which a HF tokenizer folder holds (fast tokenizer, WordPiece, BPE, SentencePiece)
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt")


#: config.json keys that hold a model's number of positions (BERT/Llama, GPT-2, a few others)
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length")


def positions_of(config: object) -> int | None:
    """The number of positions a model config (a transformers config or a config.json dict) declares."""
    for key in POSITION_KEYS:
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def declared_positions(name: str) -> int | None:
    """The positions a local or embedded model's config.json declares, read without loading the model
    (so a run can refuse a too-long input before the load); None for a hub id or an undeclared count."""
    if not name.startswith("embedded:") and not Path(name).expanduser().is_dir():
        return None
    config = Path(resolve_model_path(name)) / "config.json"
    try:
        return positions_of(json.loads(config.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # an adapter folder, or a damage check_model_folder reports when the model loads


def check_model_folder(path: Path) -> None:
    """A local model (or adapter) folder has a usable config and intact safetensors weights.

    Checked before transformers sees the folder: it would otherwise fail deep inside (a traceback from
    safetensors on a truncated file), fall back to unpickling a .bin, or guess a config.
    """
    is_adapter = (path / "adapter_config.json").is_file()
    config = path / ("adapter_config.json" if is_adapter else "config.json")
    if not config.is_file():
        raise UserError(
            f"model folder {path} has no config.json; point model.name at a HF model folder "
            "(one that save_pretrained wrote)"
        )
    try:
        loaded = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(
            f"model folder {path}: {config.name} is not valid JSON ({exc}); copy it again"
        ) from None
    if not is_adapter and (not isinstance(loaded, dict) or "model_type" not in loaded):
        raise UserError(
            f"model folder {path}: config.json has no 'model_type' (an empty or foreign config); "
            "copy the model's own config.json there"
        )
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickled = [n for n in PICKLE_WEIGHTS if (path / n).exists()]
        pickled += [f.name for f in sorted(path.glob("pytorch_model-*.bin"))]
        if pickled:
            raise UserError(
                f"model folder {path} has only pickled PyTorch weights ({pickled[0]}), "
                "which leantune does not load (unpickling can run code); convert them to safetensors "
                "(model.save_pretrained(folder, safe_serialization=True) where you trust the file)"
            )
        raise UserError(
            f"model folder {path} holds no weights (no *.safetensors file); copy the model's weights"
        )
    for file in weights:
        problem = _safetensors_problem(file)
        if problem:
            raise UserError(f"model folder {path}: {file.name} {problem}; copy or download it again")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise UserError(
                f"model folder {path}: {index.name} is not a valid shard index; copy it again"
            ) from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise UserError(f"model folder {path}: shard {missing[0]} named in {index.name} is missing")


def _safetensors_problem(file: Path) -> str | None:
    """Why a .safetensors file cannot be whole (header length, JSON header, data size), or None."""
    size = file.stat().st_size
    try:
        with file.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"is truncated ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"is truncated or not safetensors (header of {n} bytes, file of {size})"
            header = json.loads(fh.read(n))
    except (OSError, ValueError):
        return "is not a valid safetensors file"
    if not isinstance(header, dict):
        return "is not a valid safetensors file"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return f"is truncated ({size} of {expected} bytes)"
    return None


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

    folder = Path(name).expanduser()
    if folder.is_dir():  # a model folder, or a run's model/ (an adapter folder has no config.json)
        check_model_folder(folder)
        if not any((folder / f).is_file() for f in TOKENIZER_FILES):
            raise UserError(
                f"model folder {folder} has no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...); copy the "
                "tokenizer files of its base model there (tokenizer.save_pretrained)"
            )
        path = str(folder)
    else:
        path = resolve_model_path(name)
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
    options: dict | None = None,
):
    """The task model; `pad_token_id` (the tokenizer's) fills a config without one (GPT-2 style);
    `options` are more `from_pretrained` arguments (the methods' `load_options`, e.g. a
    `quantization_config`), passed on as they are."""
    import torch
    import transformers

    path = resolve_model_path(name)
    kwargs: dict = {"dtype": getattr(torch, dtype), **(options or {})}
    if task in ("classification", "multi_label"):
        names = label_names or ["0", "1"]
        kwargs |= {
            "num_labels": len(names),
            "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)},
            "ignore_mismatched_sizes": True,  # a fine-tuned classifier with another label count: new head
        }
        if task == "multi_label":  # transformers picks the loss from it: BCE with logits, multi-hot labels
            kwargs["problem_type"] = "multi_label_classification"
    elif task == "regression":
        kwargs |= {"num_labels": 1, "problem_type": "regression", "ignore_mismatched_sizes": True}
    elif task == "reward":
        kwargs |= {"num_labels": 1, "ignore_mismatched_sizes": True}
    auto_class = _AUTO_CLASS.get(task)
    if task == "prompt_classification":
        from leantune.models.prompt_head import prompt_kind

        kind = prompt_kind(path)
        auto_class = _PROMPT_CLASS[kind]
        kwargs["output_loading_info"] = kind == "masked"
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the "LOAD REPORT" on a new head is expected
    transformers.logging.disable_progress_bar()  # a bar for a 1-second load is noise
    try:
        model = _from_pretrained(getattr(transformers, auto_class), path, **kwargs)
    except ValueError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"model '{name}' cannot be used for task '{task}': {first}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    if kwargs.get("output_loading_info"):
        from leantune.models.prompt_head import check_head_loaded

        model, info = model
        check_head_loaded(model, info, name)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = (
            pad_token_id if pad_token_id is not None else load_tokenizer(name).pad_token_id
        )
    return model
