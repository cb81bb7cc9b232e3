"""The label-word head of task `prompt_classification` (data/prompts.py): class logits are the LM head's
logits of one label word per class at each example's `label_position`.

Like models/reward.py, `attach_label_words` adds forward hooks to the model (plain or PEFT-wrapped)
instead of wrapping it, so every method, every step (backprop, MeZO, LOMO, ...), checkpoints and
`save_pretrained` see the ordinary causal or masked LM, and what is saved is that LM unchanged. A batch
that carries `label_position` returns `SequenceClassifierOutput(loss=cross-entropy over the label words,
logits=(batch, classes))`, which the evaluation scores as classification; any other batch is an ordinary
forward pass. A causal LM that accepts `logits_to_keep` projects only the scored position onto the
vocabulary (the (batch, length, vocab) logits are most of an LM's activation memory).
"""

from __future__ import annotations

import inspect

from leantune.errors import UserError

HOOKED = "_leantune_label_words"
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def prompt_kind(path: str) -> str:
    """causal or masked: which LM head scores the label words of the model at `path` (folder or hub id).

    A config whose architectures name a causal LM is causal; one that names anything else and has a
    masked-LM class in transformers (BERT-style encoders) is masked; the rest cannot score words."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    config = AutoConfig.from_pretrained(path)
    archs = config.architectures or []
    if any(a.endswith(CAUSAL_SUFFIXES) for a in archs):
        return "causal"
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.is_encoder_decoder:
        return "masked"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    raise UserError(
        f"model {path} ({config.model_type}) has no causal or masked LM head to score label words; "
        "use task classification, or a causal/masked language model"
    )


def check_head_loaded(model, info: dict, path: str) -> None:
    """A masked LM whose checkpoint lacks the MLM head (a bare encoder, e.g. sentence-transformers'
    MiniLM) would score label words with a random projection: refused, not trained on noise."""
    prefix = model.base_model_prefix + "."
    missing = [k for k in info.get("missing_keys", ()) if not k.startswith(prefix)]
    if missing:
        raise UserError(
            f"model {path} has no trained masked-LM head (its weights lack {missing[0]}); "
            "prompt_classification would score label words with random weights: use task classification "
            "or a model saved with its MLM head"
        )


def _accepts_logits_to_keep(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _pre_hook(module, args, kwargs):
    positions = kwargs.pop("label_position", None)
    if positions is None:
        return None
    module.__dict__["_leantune_prompt"] = (positions, kwargs.pop("labels", None))
    if module.__dict__["_leantune_keep"]:
        kwargs["logits_to_keep"] = positions[:, None]
    return args, kwargs


def _post_hook(module, args, kwargs, output):
    saved = module.__dict__.pop("_leantune_prompt", None)
    if saved is None:
        return None
    import torch
    from transformers.modeling_outputs import SequenceClassifierOutput

    positions, labels = saved
    logits = output.logits
    if logits.shape[1] == 1:  # logits_to_keep kept just the scored position
        at = logits[:, 0]
    else:
        at = logits[torch.arange(len(positions), device=logits.device), positions]
    words = module.__dict__["_leantune_word_ids"].to(at.device)
    scores = at[:, words].float()
    loss = torch.nn.functional.cross_entropy(scores, labels) if labels is not None else None
    return SequenceClassifierOutput(loss=loss, logits=scores)


def attach_label_words(model, word_ids: list[int], kind: str):
    """Make `model(**prompt_batch)` return class logits over `word_ids` and their loss; idempotent."""
    import torch

    model.__dict__["_leantune_word_ids"] = torch.tensor(word_ids, dtype=torch.long)
    if HOOKED not in model.__dict__:  # not getattr: a PEFT model forwards it to the base model
        model.__dict__["_leantune_keep"] = kind == "causal" and _accepts_logits_to_keep(model)
        model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
        model.register_forward_hook(_post_hook, with_kwargs=True)
        model.__dict__[HOOKED] = True
    return model


def kind_of_model(name: str) -> str:
    """`prompt_kind` of a model named as in `model.name` (embedded, local folder or hub id)."""
    from leantune.models.loader import resolve_model_path

    return prompt_kind(resolve_model_path(name))


def setup_label_words(model, tok, data_cfg, model_name: str) -> dict:
    """Attach the label-word head to `model` for the run's words; what the summary records of it."""
    from leantune.data.prompts import label_word_ids

    kind = kind_of_model(model_name)
    ids, notes = label_word_ids(tok, data_cfg, list(data_cfg.label_names or []))
    attach_label_words(model, ids, kind)
    words = data_cfg.label_words if data_cfg.label_words is not None else list(data_cfg.label_names or [])
    return {
        "kind": kind,
        "template": data_cfg.template,
        "label_words": words,
        "label_tokens": tok.convert_ids_to_tokens(ids),
        "notes": notes,
    }
