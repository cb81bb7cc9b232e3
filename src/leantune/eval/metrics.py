"""Metrics computed with scikit-learn (the hub-backed `evaluate.load` fails offline)."""

from __future__ import annotations

import math
from collections import Counter

#: metrics where smaller is better; every other metric is maximised.
MINIMISED = {"loss", "perplexity", "kl"}


def classification_metrics(preds: list[int], labels: list[int], num_labels: int) -> dict[str, float]:
    """Accuracy, F1, precision, recall (binary: of class 1; otherwise macro) and MCC."""
    from sklearn.metrics import accuracy_score, matthews_corrcoef, precision_recall_fscore_support

    average = "binary" if num_labels == 2 else "macro"
    p, r, f1, _ = precision_recall_fscore_support(labels, preds, average=average, zero_division=0)
    majority = Counter(labels).most_common(1)[0][1] / len(labels) if labels else 0.0
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "f1": float(f1),
        "precision": float(p),
        "recall": float(r),
        "mcc": float(matthews_corrcoef(labels, preds)) if len(set(labels) | set(preds)) > 1 else 0.0,
        "majority_accuracy": float(majority),
    }


def lm_metrics(total_loss: float, total_tokens: int) -> dict[str, float]:
    loss = total_loss / max(total_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def is_better(metric: str, new: float, best: float | None) -> bool:
    if best is None:
        return True
    return new < best if metric in MINIMISED else new > best
