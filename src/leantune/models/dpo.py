"""DPO (Rafailov et al. 2023, task: dpo): the policy is trained on preference pairs against a frozen
reference, loss -log sigmoid(beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)))).

Why not TRL's DPOTrainer: it is a transformers.Trainer, which owns the loop, writes pickled optimizer and
RNG checkpoints and its own logs, so leantune's atomic safetensors checkpoints, exact resume after kill -9,
methods with their own step and reports would all be lost. What TRL gives a loop of its own is used:
`trl.trainer.utils.selective_log_softmax` for the per-token log-probabilities; the loss is TRL's
`loss_type="sigmoid"` line (`-F.logsigmoid(beta * delta_score)`), which TRL 1.16 keeps inside
`DPOTrainer._compute_loss` (a method of the trainer, not a function to import).

As with the reward model (models/reward.py), `attach_dpo_loss` adds forward hooks rather than wrapping
the model, so the trainer, methods, checkpoints and `save_pretrained` see the ordinary causal LM. A batch
carrying `rejected_input_ids` / `rejected_attention_mask` / `rejected_labels` (data/tasks.py) is run as
one forward pass over chosen and rejected rows; the output's `loss` is the mean DPO loss and its
`logits` are (batch, 3): the implicit rewards beta * log(pi / ref) of the chosen and the rejected
response, and the pair's KL(pi || ref) of next-token distributions averaged over its response tokens
(exact over the vocabulary at those positions; a report, not part of the loss).

The reference: a PEFT model (LoRA, ...) with its adapter disabled is the frozen base, no second copy; a
fully tuned model gets a frozen copy made when the hooks are attached (before the first step, and before
`--resume` loads trained weights), held outside the module tree so it is neither trained nor saved.
"""

from __future__ import annotations

import copy

HOOKED = "_leantune_dpo_hooks"
REFERENCE = "_leantune_reference"
IGNORE_INDEX = -100


def _needs_trl():
    try:
        from trl.trainer.utils import selective_log_softmax
    except ImportError:  # pragma: no cover - trl is in the dev extra
        from leantune.errors import UserError

        raise UserError("tasks dpo and ppo need TRL: pip install 'leantune[rlhf]' (trl==1.16.0)") from None
    return selective_log_softmax


def _pad_to(ids, width: int, value: int):
    import torch.nn.functional as F

    return F.pad(ids, (0, width - ids.shape[1]), value=value)


def reference_logits(module, input_ids, attention_mask, position_ids=None):
    """Logits of the frozen reference (no gradient): the adapter disabled, or the frozen copy."""
    import torch

    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    with torch.no_grad():
        ref = module.__dict__.get(REFERENCE)
        if ref is not None:
            ref.to(input_ids.device)  # a no-op once moved; the trainer moves only the policy
            return ref(**inputs).logits
        with module.disable_adapter():  # the base model itself: its own hooks are not this module's
            return module.get_base_model()(**inputs).logits


def token_logps(logits, labels):
    """log p(label_t | tokens < t) per position (0 where the label is ignored), shifted as HF's loss."""
    selective_log_softmax = _needs_trl()
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    logps = selective_log_softmax(logits[:, :-1].float(), labels.masked_fill(~mask, 0))
    return logps * mask, mask


def masked_kl(logits, ref_logits, mask):
    """Mean over `mask`ed positions of KL(softmax(logits) || softmax(ref_logits)) per row (no gradient)."""
    import torch

    with torch.no_grad():
        logp = logits[:, :-1][mask].float().log_softmax(-1)
        logq = ref_logits[:, :-1][mask].float().log_softmax(-1)
        per_token = (logp.exp() * (logp - logq)).sum(-1)
        rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
        total = torch.zeros(mask.shape[0], device=mask.device).index_add_(0, rows, per_token)
        return total / mask.sum(-1).clamp(min=1)


def _pre_hook(module, args, kwargs):
    if "rejected_input_ids" not in kwargs:
        return None
    import torch

    pad_id = module.config.pad_token_id
    chosen, rejected = kwargs.pop("input_ids"), kwargs.pop("rejected_input_ids")
    width = max(chosen.shape[1], rejected.shape[1])
    ids = torch.cat([_pad_to(chosen, width, pad_id), _pad_to(rejected, width, pad_id)])
    mask = torch.cat(
        [
            _pad_to(kwargs.pop("attention_mask"), width, 0),
            _pad_to(kwargs.pop("rejected_attention_mask"), width, 0),
        ]
    )
    labels = torch.cat(
        [
            _pad_to(kwargs.pop("labels"), width, IGNORE_INDEX),
            _pad_to(kwargs.pop("rejected_labels"), width, IGNORE_INDEX),
        ]
    )
    kwargs["input_ids"], kwargs["attention_mask"] = ids, mask
    module.__dict__["_leantune_dpo_batch"] = (chosen.shape[0], labels, reference_logits(module, ids, mask))
    return args, kwargs


def _post_hook(module, args, kwargs, output):
    pending = module.__dict__.pop("_leantune_dpo_batch", None)
    if pending is None:
        return None
    import torch
    from transformers.modeling_outputs import SequenceClassifierOutput

    n, labels, ref_logits = pending
    beta = module.__dict__[HOOKED]
    logps, mask = token_logps(output.logits, labels)
    ref_logps, _ = token_logps(ref_logits, labels)
    rewards = beta * (logps.sum(-1) - ref_logps.sum(-1))  # implicit rewards: the policy's gain over ref
    chosen, rejected = rewards[:n], rewards[n:]
    loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()  # TRL's loss_type="sigmoid"
    kl = masked_kl(output.logits, ref_logits, mask)
    pair_kl = (kl[:n] * mask[:n].sum(-1) + kl[n:] * mask[n:].sum(-1)) / mask.view(2, n, -1).sum((0, 2)).clamp(
        min=1
    )
    return SequenceClassifierOutput(
        loss=loss, logits=torch.stack([chosen, rejected, pair_kl], dim=-1).detach()
    )


def has_adapter(model) -> bool:
    """A PEFT model: disabling its adapter gives the base model back."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def attach_dpo_loss(model, beta: float, reference=None):
    """Make `model(**pair_batch)` return the DPO loss against the frozen reference; returns `model`.

    Call it before training starts: a model without an adapter is copied here as its reference, unless
    `reference` (the base model, for a reloaded fully tuned run) is given."""
    _needs_trl()
    if HOOKED not in model.__dict__:
        if not has_adapter(model):
            reference = reference if reference is not None else copy.deepcopy(model)
            model.__dict__[REFERENCE] = reference.eval().requires_grad_(False)
        model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
        model.register_forward_hook(_post_hook, with_kwargs=True)
    model.__dict__[HOOKED] = beta
    return model
