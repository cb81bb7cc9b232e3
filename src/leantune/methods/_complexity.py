"""Candidate task-complexity signals from dynamic_rank's probe batches (issue 19 item 2).

The rank cap is max_rank x (1/4 + 3/4 complexity), so the complexity signal sets the rank under the
default `allocation: uniform`. Seed 002's signal (label entropy and probe loss vs chance, `_importance.
task_complexity`) sat at 0.96-1.0 on every real task: a classifier head at initialisation is at chance
whatever the task, and balanced labels have entropy ~1. The candidates here read what the probe's
gradients and a few probe steps say about the task instead; each is mapped to [0, 1], higher = harder.
`benchmarks/seed002_complexity.py` measures them against the accuracy of a fixed LoRA run on four tasks
of known difficulty and `COMPLEXITY_SIGNAL` names the one dynamic_rank uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

#: the candidate that becomes `complexity`: the one benchmarks/seed002_complexity.py's rule selected in
#: measures.json (Spearman 0.8 vs difficulty over 4 tasks, weak evidence; tied with loss_fall, which
#: separates the tasks less far beyond its seed noise; loss_vs_chance's 1.0 is within its seed noise)
COMPLEXITY_SIGNAL = "stable_rank"
#: Adam step size of the loss-fall probe (the seed002 suites' training lr is 2e-3; a larger step lets four
#: steps show a difference without a warmup)
FALL_LR = 1e-2


@dataclass
class GradStats:
    """Running sums over probe micro-batches of each candidate weight's gradient: enough for the noise
    scale and the stable rank without keeping every micro-batch's gradient (one extra copy per layer)."""

    rows: int = 0  # rows per micro-batch (the last, shorter slice of a batch is skipped)
    count: int = 0
    sq_norm_sum: float = 0.0  # sum_j |g_j|^2 over micro-batches j (all layers concatenated)
    grad_sum: dict[str, Any] = field(default_factory=dict)  # sum_j g_j per layer

    def start_slice(self, rows: int) -> bool:
        """Count a micro-batch of `rows` rows; False (skip it) when its size differs from the first's."""
        if self.rows and rows != self.rows:
            return False  # the noise estimate assumes micro-batches of one size
        self.rows = rows
        self.count += 1
        return True

    def add_grad(self, name: str, grad, scale: float) -> None:
        """Add `scale` x one layer's gradient of the current micro-batch (scale turns it into its mean)."""
        self.sq_norm_sum += float(grad.pow(2).sum()) * scale**2
        acc = self.grad_sum.get(name)
        if acc is None:
            self.grad_sum[name] = grad.detach() * scale
        else:
            acc.add_(grad.detach(), alpha=scale)


class ProbeLoss(float):
    """The mean probe loss, carrying the probe's `GradStats` and loss-fall record along.

    Why a float: `leantune plan` (recipes/plan.py) passes score_layers' loss straight to complexity_of;
    riding on that value lets the plan and the training run compute the same complexity."""

    stats: GradStats | None = None
    falls: list[float] | None = None


def noise_scale(stats: GradStats) -> float:
    """Gradient noise scale B_simple = tr(Sigma) / |G|^2, in examples (McCandlish et al. 2018).

    What: how many examples a batch needs before its gradient points where the mean gradient points.
    Why: a task whose examples pull in many different directions (harder, more to learn) has a larger
    noise scale; McCandlish et al. find it grows as tasks get harder. tr(Sigma) (per-example covariance)
    = b x the variance of b-row micro-batch gradients; |G|^2 is debiased by tr(Sigma) / #rows."""
    n, b = stats.count, stats.rows
    if n < 2:
        return float("nan")
    mean_sq = sum(float(s.pow(2).sum()) for s in stats.grad_sum.values()) / n**2  # |mean g|^2
    var = (stats.sq_norm_sum / n - mean_sq) * n / (n - 1)  # E|g_j - G|^2
    trace = b * max(var, 0.0)
    g2 = max(mean_sq - trace / (n * b), 1e-12 * max(mean_sq, 1e-30))
    return trace / g2


def stable_rank(stats: GradStats) -> float:
    """Mean over layers of the stable rank |G|_F^2 / |G|_2^2 of the mean probe gradient of each weight.

    What: how many directions of a weight the task's gradient spreads over. Why: LoRA of rank r can
    follow r directions; a gradient near rank one says a low rank suffices (easy, one feature decides)."""
    import torch

    ranks = []
    for g in stats.grad_sum.values():
        mat = g.reshape(g.shape[0], -1).double()
        top = float(torch.linalg.matrix_norm(mat, ord=2)) ** 2
        if top > 0:
            ranks.append(float(mat.pow(2).sum()) / top)
    return sum(ranks) / len(ranks) if ranks else float("nan")


def loss_fall_probe(model, batches: list[dict[str, Any]], micro_batch: int = 8) -> list[float]:
    """The loss of each probe batch just before an Adam step (lr FALL_LR) on it, over the trainable
    parameters; weights, gradients, training mode and the RNG are restored afterwards.

    Each batch is seen before it is trained on, so the fall is how fast the task generalises from a
    handful of examples, not how fast a batch is memorised."""
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in trainable]
    grads_before = [p.grad for p in trainable]
    was_training = model.training
    device = next(model.parameters()).device
    losses: list[float] = []
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            opt = torch.optim.Adam(trainable, lr=FALL_LR)
            for p in trainable:
                p.grad = None
            for batch in batches:
                rows = len(next(iter(batch.values())))
                total = 0.0
                for start in range(0, rows, micro_batch):
                    part = {k: v[start : start + micro_batch].to(device) for k, v in batch.items()}
                    share = len(next(iter(part.values()))) / rows
                    out = model(**part)
                    (out.loss * share).backward()
                    total += float(out.loss.detach()) * share
                losses.append(total)
                opt.step()
                opt.zero_grad(set_to_none=True)
    finally:
        with torch.no_grad():
            for p, s, g in zip(trainable, saved, grads_before, strict=True):
                p.copy_(s)
                p.grad = g
        model.train(was_training)
    return losses


def relative_fall(losses: list[float]) -> float:
    """(first - last) / first of the loss-fall probe: the share of the initial loss gone after a few steps
    (easy tasks fall fast). The last value is the mean of the last half, to damp one batch's noise."""
    if len(losses) < 2 or losses[0] <= 0:
        return float("nan")
    tail = losses[len(losses) // 2 :]
    return (losses[0] - sum(tail) / len(tail)) / losses[0]


def candidates(
    probe_loss: float, num_classes: int, stats: GradStats | None, falls: list[float] | None, batch: int
) -> dict[str, float]:
    """Every candidate's raw value and its [0, 1] mapping (`cx_*`, higher = harder). Rules:
    - cx_loss_vs_chance = min(1, probe loss / log K) (seed 002's loss part; d in the issue);
    - cx_loss_fall = clip(1 - 2 x relative fall, 0, 1) (a fall of half the loss or more: easiest);
    - cx_noise_scale = B / (B + batch) (1/2 when the noise scale equals the training batch);
    - cx_stable_rank = 1 - 1 / stable rank (one direction: 0)."""
    k = max(num_classes, 2)
    out = {"loss_vs_chance": probe_loss / math.log(k)}
    out["cx_loss_vs_chance"] = min(1.0, max(0.0, out["loss_vs_chance"]))
    if falls:
        fall = relative_fall(falls)
        out["loss_fall"] = fall
        out["cx_loss_fall"] = _clip01(1 - 2 * fall)
    if stats is not None and stats.count:
        b_simple = noise_scale(stats)
        out["noise_scale"] = b_simple
        out["cx_noise_scale"] = b_simple / (b_simple + batch) if math.isfinite(b_simple) else float("nan")
        srank = stable_rank(stats)
        out["stable_rank"] = srank
        out["cx_stable_rank"] = _clip01(1 - 1 / srank) if srank > 0 else float("nan")
    return out


def _clip01(x: float) -> float:
    return float("nan") if math.isnan(x) else min(1.0, max(0.0, x))
