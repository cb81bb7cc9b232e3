"""Layer importance and task complexity from a few probe batches.

Importance of a candidate layer is the first-order sensitivity of the loss to its frozen weight,
sum |W * dL/dW| (Molchanov et al. 2019; AdaLoRA scores its triplets the same way): it needs one backward
pass with the candidate weights' gradients switched on, and it scores layers that have no adapter yet
(rank 0), which LoRA's own gradients cannot. `task_complexity` is seed 002's signal (label entropy and
probe loss relative to chance); it sat at 0.96-1.0 on every real task, so dynamic_rank now takes its
complexity from `_complexity` (issue 19 item 2) and keeps this one in the report as `complexity_seed002`.
Probes run in eval mode under a forked RNG so they change neither the weights, nor the gradients, nor
the random stream of the run.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from leantune.methods._lora_ranks import lora_layers


def probe_batches(features: list[dict], batch_size: int, count: int, pad_id: int, offset: int = 0):
    """`count` batches of rows drawn without replacement from the whole split by a permutation seeded with
    `offset` (which varies them per re-probe; deterministic, independent of the run's RNG).

    Why drawn, not consecutive: training splits may be stored grouped by label (the builtin Rotten
    Tomatoes and TREC splits are: their first 128 rows are 98% one class), and consecutive rows then
    probe a single class: the head's gradient all points one way, the importance reflects that class
    only, and the loss falls at once as the head learns the constant answer."""
    import random

    from leantune.data.tasks import collate

    n = len(features)
    if n == 0:
        return []
    rows = min(batch_size, n)
    order = random.Random(f"probe:{offset}").sample(range(n), min(n, count * rows))
    out = []
    for i in range(count):
        idx = [order[(i * rows + j) % len(order)] for j in range(rows)]
        out.append(collate([features[k] for k in idx], pad_id))
    return out


def layer_importance(
    model, batches: list[dict[str, Any]], micro_batch: int = 8, stats=None
) -> tuple[dict[str, float], float]:
    """Normalised sum |W * dL/dW| per LoRA layer (shares summing to 1), and the mean probe loss.

    Each batch runs in slices of `micro_batch` rows whose gradients add up to the batch's: the probe
    backpropagates through every block (it scores layers below the lowest adapter too), so at the
    training batch size it would hold about a full fine-tuning step's activations, more than a small
    budget allows (an estimate, not measured separately). For a loss that is
    a mean over rows the scores are those of the whole batch (up to float rounding); for a per-token
    mean the rows are weighted by count, not by tokens. With `stats` (a `_complexity.GradStats`) each
    slice's own gradient is recorded too, for the complexity candidates (noise scale, stable rank)."""
    import torch

    layers = lora_layers(model)
    weights = {n: layer.get_base_layer().weight for n, layer in layers.items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads_before = [p.grad for p in trainable]
    flags = {n: w.requires_grad for n, w in weights.items()}
    scores = dict.fromkeys(layers, 0.0)
    loss_sum = 0.0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.random.fork_rng(devices=[]):
            for w in weights.values():
                w.requires_grad_(True)
                w.grad = None
            for batch in batches:
                rows = len(next(iter(batch.values())))
                for start in range(0, rows, micro_batch):
                    part = {k: v[start : start + micro_batch].to(device) for k, v in batch.items()}
                    share = len(next(iter(part.values()))) / rows
                    held = _hold_grads(weights) if stats is not None else {}
                    out = model(**part)
                    (out.loss * share).backward()  # gradients add up to the whole batch's mean loss
                    loss_sum += float(out.loss.detach()) * share
                    if stats is not None:
                        _record_slice(stats, weights, held, share, round(share * rows))
                for n, w in weights.items():
                    scores[n] += float((w.detach() * w.grad).abs().sum())
                    w.grad = None
    finally:
        for n, w in weights.items():
            w.grad = None
            w.requires_grad_(flags[n])
        for p, g in zip(trainable, grads_before, strict=True):
            p.grad = g
        model.train(was_training)
    total = sum(scores.values()) or 1.0
    return {n: s / total for n, s in scores.items()}, loss_sum / max(len(batches), 1)


def _hold_grads(weights: dict[str, Any]) -> dict[str, Any]:
    """Take the batch's gradients so far off the weights: the next backward then holds one slice's own."""
    held = {n: w.grad for n, w in weights.items()}
    for w in weights.values():
        w.grad = None
    return held


def _record_slice(stats, weights: dict[str, Any], held: dict[str, Any], share: float, rows: int) -> None:
    """Give the slice's own mean-loss gradient (.grad / share) to `stats`, then add the held batch sum
    back, in place: one extra gradient copy (the held sum) instead of a snapshot plus a difference."""
    if stats.start_slice(rows):
        for n, w in weights.items():
            stats.add_grad(n, w.grad, 1 / share)
    for n, w in weights.items():
        if held[n] is not None:
            w.grad = held[n].add_(w.grad)


def class_labels(features) -> list[Any]:
    """The integer class labels of a split (token-level labels of LM tasks are not classes)."""
    return [f["labels"] for f in features if isinstance(f.get("labels"), int)]


def task_complexity(labels: list[Any], num_classes: int, probe_loss: float) -> dict[str, float]:
    """In [0, 1]: the mean of normalised label entropy and probe loss over chance loss (log K)."""
    k = max(num_classes, 2)
    counts = Counter(labels)
    n = sum(counts.values()) or 1
    entropy = -sum(c / n * math.log(c / n) for c in counts.values() if c)
    entropy_norm = entropy / math.log(k)
    loss_norm = min(1.0, probe_loss / math.log(k))
    return {
        "label_entropy": entropy_norm,
        "probe_loss": probe_loss,
        "loss_vs_chance": loss_norm,
        "complexity": 0.5 * (entropy_norm + loss_norm),
    }


def drift(old: dict[str, float], new: dict[str, float]) -> float:
    """Total-variation distance between two importance distributions (0: same, 1: disjoint)."""
    return 0.5 * sum(abs(old.get(n, 0.0) - new.get(n, 0.0)) for n in set(old) | set(new))
