"""Metrics computed with scikit-learn (the hub-backed `evaluate.load` fails offline)."""

from __future__ import annotations

import math
from collections import Counter

#: metrics where smaller is better; every other metric is maximised.
MINIMISED = {"loss", "perplexity", "mse", "rmse", "mae", "kl"}


def classification_metrics(preds: list[int], labels: list[int], num_labels: int) -> dict[str, float]:
    """Accuracy, F1, precision, recall (binary: of class 1; otherwise macro), their macro averages over
    all classes (also for binary: a run that predicts one class scores 0 F1 on the other) and MCC."""
    from sklearn.metrics import accuracy_score, matthews_corrcoef, precision_recall_fscore_support

    average = "binary" if num_labels == 2 else "macro"
    p, r, f1, _ = precision_recall_fscore_support(labels, preds, average=average, zero_division=0)
    mp, mr, mf1, _ = precision_recall_fscore_support(labels, preds, average="macro", zero_division=0)
    majority = Counter(labels).most_common(1)[0][1] / len(labels) if labels else 0.0
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "f1": float(f1),
        "precision": float(p),
        "recall": float(r),
        "macro_f1": float(mf1),
        "macro_precision": float(mp),
        "macro_recall": float(mr),
        "mcc": float(matthews_corrcoef(labels, preds)) if len(set(labels) | set(preds)) > 1 else 0.0,
        "majority_accuracy": float(majority),
    }


def regression_metrics(preds: list[float], labels: list[float]) -> dict[str, float]:
    """MSE, RMSE, MAE (scikit-learn), Pearson and Spearman correlation (scipy), and the MSE of the
    best constant prediction (the labels' own mean, i.e. their variance): a run that does not beat
    `baseline_mse` learned nothing a constant could not. A correlation of constant predictions is
    undefined; it is reported as 0."""
    import numpy as np
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    if not labels:
        return {}
    p, y = np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    mse = float(mean_squared_error(y, p))
    varied = len(y) > 1 and p.std() > 0 and y.std() > 0
    return {
        "mse": mse,
        "rmse": math.sqrt(mse),
        "mae": float(mean_absolute_error(y, p)),
        "pearson": float(pearsonr(p, y).statistic) if varied else 0.0,
        "spearman": float(spearmanr(p, y).statistic) if varied else 0.0,
        "baseline_mse": float(((y - y.mean()) ** 2).mean()),
    }


def multi_label_metrics(
    probs: list[list[float]], labels: list[list[float]], names: list[str], threshold: float
) -> dict[str, float]:
    """Micro/macro F1, micro precision/recall, subset accuracy (every label of a row right) and per-label
    precision/recall/F1 (`f1/<label>`, ...) of the rows' label sets, a label predicted where its
    probability is >= `threshold`. `majority_micro_f1` is the all-majority baseline: each label predicted
    as its most common value in these rows (usually "absent" everywhere, whose micro F1 is 0)."""
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    if not labels:
        return {}
    y = np.asarray(labels, dtype=np.int64)
    pred = (np.asarray(probs, dtype=np.float64) >= threshold).astype(np.int64)
    p, r, f1, _ = precision_recall_fscore_support(y, pred, average="micro", zero_division=0)
    per_p, per_r, per_f1, _ = precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    majority = np.broadcast_to((y.mean(axis=0) > 0.5).astype(np.int64), y.shape)
    out = {
        "micro_f1": float(f1),
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        "micro_precision": float(p),
        "micro_recall": float(r),
        "subset_accuracy": float(accuracy_score(y, pred)),
        "majority_micro_f1": float(f1_score(y, majority, average="micro", zero_division=0)),
    }
    for i, name in enumerate(names):
        out |= {
            f"precision/{name}": float(per_p[i]),
            f"recall/{name}": float(per_r[i]),
            f"f1/{name}": float(per_f1[i]),
        }
    return out


def lm_metrics(total_loss: float, total_tokens: int) -> dict[str, float]:
    loss = total_loss / max(total_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def is_better(metric: str, new: float, best: float | None) -> bool:
    if best is None:
        return True
    return new < best if metric in MINIMISED else new > best
