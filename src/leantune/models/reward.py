"""A reward model: a causal LM (or any encoder) with a one-output sequence-classification head, trained
on preference pairs with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected).

`attach_pair_loss` adds two forward hooks to the model (plain or PEFT-wrapped) rather than wrapping it,
so every method, the trainer's steps (backprop, MeZO, LOMO, ...), checkpoints and `save_pretrained` see
the ordinary model, and what is saved is a standard `AutoModelForSequenceClassification` with one label.
A batch that carries `rejected_input_ids` / `rejected_attention_mask` (data/tasks.py) is run as one
forward pass over chosen and rejected rows together; the output's `loss` is the mean Bradley-Terry loss
and its `logits` are (batch, 2): the chosen and the rejected reward. A batch without them is an ordinary
forward pass (one reward per row: `logits[:, 0]`). The head reads the last non-padding token (HF's rule).
"""

from __future__ import annotations

HOOKED = "_leantune_pair_hooks"


def _pad_to(ids, width: int, value: int):
    import torch.nn.functional as F

    return F.pad(ids, (0, width - ids.shape[1]), value=value)


def _pre_hook(module, args, kwargs):
    if "rejected_input_ids" not in kwargs:
        return None
    import torch

    chosen, rejected = kwargs.pop("input_ids"), kwargs.pop("rejected_input_ids")
    chosen_mask, rejected_mask = kwargs.pop("attention_mask"), kwargs.pop("rejected_attention_mask")
    kwargs.pop("labels", None)
    pad_id = module.config.pad_token_id
    width = max(chosen.shape[1], rejected.shape[1])
    kwargs["input_ids"] = torch.cat([_pad_to(chosen, width, pad_id), _pad_to(rejected, width, pad_id)])
    kwargs["attention_mask"] = torch.cat([_pad_to(chosen_mask, width, 0), _pad_to(rejected_mask, width, 0)])
    module.__dict__["_leantune_pairs"] = chosen.shape[0]
    return args, kwargs


def _post_hook(module, args, kwargs, output):
    n = module.__dict__.pop("_leantune_pairs", None)
    if n is None:
        return None
    import torch
    from transformers.modeling_outputs import SequenceClassifierOutput

    reward = output.logits[:, 0].float()
    chosen, rejected = reward[:n], reward[n:]
    loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
    return SequenceClassifierOutput(loss=loss, logits=torch.stack([chosen, rejected], dim=-1))


def method_task(task: str) -> str:
    """The task methods see: a reward model, a regressor and a multi-label classifier are sequence
    classifiers (their head trained and saved like one; only the labels and the loss differ); a prompt
    classifier (its LM head scores the label words, models/prompt_head.py) and a DPO or PPO policy are
    language models."""
    from leantune.settings import HEAD_TASKS

    if task in ("prompt_classification", "dpo", "ppo"):
        return "causal_lm"
    return "classification" if task in HEAD_TASKS else task


def attach_pair_loss(model):
    """Make `model(**pair_batch)` return the Bradley-Terry loss; idempotent; returns `model`."""
    if HOOKED not in model.__dict__:  # not getattr: a PEFT model forwards it to the base model
        model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
        model.register_forward_hook(_post_hook, with_kwargs=True)
        model.__dict__[HOOKED] = True
    return model
