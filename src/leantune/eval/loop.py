"""Evaluate a model on tokenised examples, sharded across processes and gathered on every rank."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from leantune.data.tasks import IGNORE_INDEX, collate
from leantune.eval.metrics import (
    classification_metrics,
    lm_metrics,
    multi_label_metrics,
    regression_metrics,
)


@torch.no_grad()
def evaluate(
    model,
    features: list[dict],
    task: str,
    batch_size: int,
    pad_id: int,
    rank: int = 0,
    world: int = 1,
    num_labels: int = 2,
    lockstep: bool = False,
    label_names: list[str] | None = None,
    threshold: float = 0.5,
    confusion: bool = False,
) -> dict:
    """Metrics over all of `features`; every rank gets the same numbers (no rank decides alone).

    `lockstep`: every rank runs the same number of forward passes (a sharded FSDP model all-gathers in
    each one, so a rank with one batch fewer would leave the others waiting); the extra pass of a rank
    with fewer examples repeats its first batch and is not counted. Regression scores the head's one
    output; multi-label its per-label sigmoids against `threshold` (names from `label_names`).
    `confusion`: classification also returns `confusion_matrix` (rows: true class, columns: predicted,
    in label-id order), the one non-number in the dict (the final test evaluation asks for it, for the
    bench report).
    """
    from accelerate.utils import gather_object

    if task == "ppo":  # prompts alone: scored by generation under the reward model (train/ppo.py)
        return {}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mine = features[rank::world]
    preds: list = []
    labels: list = []
    loss_sum, tokens = 0.0, 0
    if lockstep:  # rank 0's share is the largest: ceil(len / world) examples
        most, have = -(-len(features) // world), len(mine)
        for _ in range(-(-most // batch_size) - -(-have // batch_size)):
            model(**{k: v.to(device) for k, v in collate(features[:batch_size], pad_id).items()})
    starts = range(0, len(mine), batch_size)
    # a bar only where evaluation is long enough to wonder about (and on one rank)
    bar = tqdm(starts, desc="eval", unit="batch", leave=False, disable=rank != 0 or len(starts) < 20)
    for start in bar:
        batch = {k: v.to(device) for k, v in collate(mine[start : start + batch_size], pad_id).items()}
        out = model(**batch)
        if task == "dpo":  # logits are (chosen reward, rejected reward, KL) per pair (models/dpo.py)
            preds += out.logits.tolist()
            loss_sum += float(out.loss) * len(out.logits)
            tokens += len(out.logits)
        elif task == "reward":  # logits are (chosen, rejected) rewards (models/reward.py); a tie is wrong
            preds += (out.logits[:, 0] > out.logits[:, 1]).long().tolist()
            labels += [1] * len(out.logits)
            loss_sum += float(out.loss) * len(out.logits)
            tokens += len(out.logits)
        elif task in ("classification", "prompt_classification", "regression", "multi_label"):
            preds += _head_predictions(task, out.logits)
            labels += batch["labels"].tolist()
            loss_sum += float(out.loss) * len(batch["labels"])
            tokens += len(batch["labels"])
        else:
            n = _target_tokens(batch["labels"], shifted=task == "causal_lm")
            if n:  # a batch without target tokens has a NaN mean loss and nothing to add
                loss_sum += float(out.loss) * n
                tokens += n
    model.train(was_training)
    if world > 1:
        parts = gather_object([(preds, labels, loss_sum, tokens)])
        preds = [p for part in parts for p in part[0]]
        labels = [lab for part in parts for lab in part[1]]
        loss_sum = sum(part[2] for part in parts)
        tokens = sum(part[3] for part in parts)
    if task == "dpo":
        return dpo_metrics(preds, loss_sum / max(tokens, 1))
    if task == "reward":
        return {"accuracy": sum(preds) / max(len(preds), 1), "loss": loss_sum / max(tokens, 1)}
    if task in ("classification", "prompt_classification"):
        out = {**classification_metrics(preds, labels, num_labels), "loss": loss_sum / max(tokens, 1)}
        if confusion:
            from sklearn.metrics import confusion_matrix

            out["confusion_matrix"] = confusion_matrix(labels, preds, labels=range(num_labels)).tolist()
        return out
    if task == "regression":
        return {**regression_metrics(preds, labels), "loss": loss_sum / max(tokens, 1)}
    if task == "multi_label":
        names = label_names or [str(i) for i in range(len(labels[0]) if labels else 0)]
        return {**multi_label_metrics(preds, labels, names, threshold), "loss": loss_sum / max(tokens, 1)}
    return lm_metrics(loss_sum, tokens)


def _head_predictions(task: str, logits: torch.Tensor) -> list:
    """Class ids (arg-max), scores (the one output) or per-label probabilities (sigmoid)."""
    if task == "regression":
        return logits.float()[:, 0].tolist()
    if task == "multi_label":
        return torch.sigmoid(logits.float()).tolist()
    return logits.argmax(-1).tolist()


def _target_tokens(labels: torch.Tensor, shifted: bool) -> int:
    """Tokens the HF loss averages over (causal LMs predict token t+1, so the first label never counts)."""
    if shifted:
        labels = labels[:, 1:]
    return int((labels != IGNORE_INDEX).sum())


def dpo_metrics(pairs: list[list[float]], loss: float) -> dict[str, float]:
    """From (chosen reward, rejected reward, KL) per pair: how often and by how much chosen wins (a tie
    is a loss, as for reward models), the mean rewards and the mean KL to the reference."""
    n = max(len(pairs), 1)
    return {
        "loss": loss,
        "reward_accuracy": sum(c > r for c, r, _ in pairs) / n,
        "reward_margin": sum(c - r for c, r, _ in pairs) / n,
        "chosen_reward": sum(c for c, _, _ in pairs) / n,
        "rejected_reward": sum(r for _, r, _ in pairs) / n,
        "kl": sum(k for _, _, k in pairs) / n,
    }
