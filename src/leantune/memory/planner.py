"""Choose a LoRA rank per layer (0 allowed) so that the memory model's estimate fits a budget.

No library plans ranks against memory: peft's AdaLoRA redistributes a fixed rank budget by sensitivity
and never looks at bytes. Here each layer gets a *target* rank from its importance share and the task's
complexity, then ranks grow by doubling, most important layer first, for as long as the whole step
still fits the budget; every decision keeps its reason. If even the smallest useful configuration
(rank 1 on the most important layer) does not fit, the planner may switch on recomputation and halve
the batch, where allowed, and otherwise reports the smallest budget that would fit.

Activation memory depends on *which* layers train (backward starts at the lowest one) and linearly on
each rank (the saved L x r input of B): the model is traced once per distinct set of active layers and
the rank term added per layer.

The planner never imports a method. What it prices it reads off the model (LoRA sites through
`leantune.models.lora_sites`); what a method not yet applied would change (a 4-bit base) comes in as a
`MemoryContribution`, which the method's `MethodSpec.plan_for` hook computes (`leantune plan` asks
`quant`); without one, a 4-bit base is priced with the quant method's defaults (NF4, blocks of 64,
double quantisation) over `leantune.models.quantizable`, the layers that method replaces.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from leantune.memory.contribution import MemoryContribution
from leantune.memory.estimate import (
    ADAM_STEP_BYTES,
    OPTIMIZER_TRANSIENT_FACTOR,
    TRANSIENT_FACTOR,
    blocks_prefix,
    gradient_checkpointing,
    trace_activations,
)
from leantune.models.lora_sites import lora_layers, rank_of
from leantune.models.quantizable import frozen_linear_weights, packed_bytes_per_weight

LORA_BYTES_PER_PARAM = 4 * (1 + 1 + 2)  # fp32 weight, gradient, AdamW's two moments
DEFAULT_QUANT_NOTE = "4-bit NF4 base (add {name: quant, bits: 4} before the LoRA method)"


@dataclass
class LayerPlan:
    name: str
    importance: float
    target: int
    rank: int
    bytes: int  # LoRA weights + gradients + optimizer state + the rank's saved activations
    reason: str


@dataclass
class Plan:
    budget_bytes: int
    batch_size: int
    recompute: bool
    complexity: float
    max_rank: int
    estimate: dict[str, int]
    layers: list[LayerPlan] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    safety_margin: float = 0.0  # the plan fits (1 - margin) x budget: room for the model's error
    quantize: bool = False  # the plan assumes a 4-bit base (allow_quantize), which the config must add

    @property
    def ranks(self) -> dict[str, int]:
        return {layer.name: layer.rank for layer in self.layers}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ranks": self.ranks}


def pow2_round(x: float) -> int:
    """The nearest power of two in log scale (0 below 0.5): ranks move in doublings."""
    return 0 if x < 0.5 else 2 ** max(0, round(math.log2(x)))


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@contextmanager
def only_active(layers: dict[str, Any], active: frozenset[str]) -> Iterator[None]:
    """Switch peft's adapters off (per layer) outside `active`, as rank 0 would leave them."""
    saved = {n: layer._disable_adapters for n, layer in layers.items()}
    try:
        for n, layer in layers.items():
            layer._disable_adapters = n not in active
        yield
    finally:
        for n, layer in layers.items():
            layer._disable_adapters = saved[n]


class RankCost:
    """The memory model as a function of per-layer ranks, batch size and recomputation."""

    def __init__(self, model, task: str, seq_len: int) -> None:
        self.model, self.task, self.seq_len = model, task, seq_len
        self.layers = lora_layers(model)
        self.trace_ranks = {n: rank_of(layer) for n, layer in self.layers.items()}
        if any(r == 0 for r in self.trace_ranks.values()):
            raise ValueError("trace the model with every candidate layer at rank >= 1")
        self.shape = {
            n: (layer.get_base_layer().in_features, layer.get_base_layer().out_features)
            for n, layer in self.layers.items()
        }
        lora_ids = {
            id(p)
            for layer in self.layers.values()
            for mod in (layer.lora_A, layer.lora_B)
            for p in mod.parameters()
        }
        self.weight_bytes = 0
        self.other_trainable_bytes = 0
        self.other_trainable_tensors = 0
        self.largest_other = 0
        for p in model.parameters():
            if id(p) in lora_ids:
                continue
            self.weight_bytes += p.numel() * p.element_size()
            if p.requires_grad:
                self.other_trainable_bytes += p.numel() * p.element_size()
                self.other_trainable_tensors += 1
                self.largest_other = max(self.largest_other, p.numel() * p.element_size())
        self._traces: dict[tuple[frozenset[str], bool], tuple[int, int]] = {}
        self.prefix = blocks_prefix(model)
        self.quantizable_bytes, self.quantizable_numel = frozen_linear_weights(model, lora_ids)
        self.contribution = MemoryContribution()  # set by `quantized_base`

    @property
    def weight_saving(self) -> int:
        return -self.contribution.weights

    def quantized_base(self, contribution: MemoryContribution | None = None) -> RankCost:
        """The same costs on a quantised base: `contribution` as the quant method's `plan_for` gives it,
        or by default the frozen linear weights stored as NF4 (`methods: [{name: quant, bits: 4}, ...]`):
        4 bits a weight plus an 8-bit absmax per 64 and an fp32 scale per 256 absmaxes."""
        other = copy.copy(self)
        if contribution is None:
            packed = int(self.quantizable_numel * packed_bytes_per_weight(4, 64, True))
            contribution = MemoryContribution(
                weights=packed - self.quantizable_bytes if self.quantizable_bytes else 0,
                note=DEFAULT_QUANT_NOTE,
            )
        other.contribution = contribution
        return other

    def _trace(self, active: frozenset[str], recompute: bool) -> tuple[int, int]:
        key = (active, recompute)
        if key not in self._traces:
            with only_active(self.layers, active):
                plain = trace_activations(self.model, self.task, self.seq_len)
                saved = plain.total
                if recompute:
                    with gradient_checkpointing(self.model, True):
                        ckpt = trace_activations(self.model, self.task, self.seq_len)
                    blocks = [v for k, v in plain.per_layer.items() if k != "other"]
                    saved = ckpt.total + max(blocks, default=0)
            self._traces[key] = (saved, plain.largest)
        return self._traces[key]

    def lora_param_bytes(self, name: str, rank: int) -> int:
        d_in, d_out = self.shape[name]
        return rank * (d_in + d_out) * LORA_BYTES_PER_PARAM + (2 * ADAM_STEP_BYTES if rank else 0)

    def rank_activation_bytes(self, name: str, rank: int, batch: int) -> int:
        return (rank - self.trace_ranks[name]) * self.seq_len * 4 * batch if rank else 0

    def breakdown(self, ranks: dict[str, int], batch: int, recompute: bool) -> dict[str, int]:
        active = frozenset(n for n, r in ranks.items() if r > 0)
        saved, largest = self._trace(active, recompute)
        lora = sum(self.lora_param_bytes(n, r) for n, r in ranks.items())
        lora_weights = sum(r * sum(self.shape[n]) * 4 for n, r in ranks.items())
        activations = saved * batch + sum(self.rank_activation_bytes(n, r, batch) for n, r in ranks.items())
        other = self.other_trainable_bytes
        extra = self.contribution
        out = {
            "weights": self.weight_bytes + extra.weights + lora_weights,
            "gradients": other + lora_weights + extra.gradients,
            "optimizer_state": 2 * other
            + self.other_trainable_tensors * ADAM_STEP_BYTES
            + (lora - 2 * lora_weights)
            + extra.optimizer_state,
            "activations": activations + extra.activations,
            "transient": int(TRANSIENT_FACTOR * largest * batch),
        }
        largest_lora = max((r * max(self.shape[n]) * 4 for n, r in ranks.items()), default=0)
        update = int(OPTIMIZER_TRANSIENT_FACTOR["adamw"] * max(self.largest_other, largest_lora))
        # backward frees activations as it creates gradients; the update peaks later (see MemoryEstimate)
        out["total"] = (
            out["weights"]
            + out["optimizer_state"]
            + max(out["activations"] + out["transient"], out["gradients"] + update)
        )
        return out

    def total(self, ranks: dict[str, int], batch: int, recompute: bool) -> int:
        return self.breakdown(ranks, batch, recompute)["total"]


def targets_from_importance(
    importance: dict[str, float], complexity: float, max_rank: int, min_share: float, uniform: bool = False
) -> tuple[int, dict[str, int]]:
    """The complexity-scaled rank cap, and each layer's target: cap x importance / top importance.

    `uniform`: every layer targets the cap. The budget still decides how far ranks double, and in what
    order (most important first). That is the control that separates what the budget does from what the
    importance-proportional targets do."""
    cap = max(1, pow2_round(max_rank * (0.25 + 0.75 * complexity)))
    if uniform:
        return cap, dict.fromkeys(importance, cap)
    top = max(importance.values()) or 1.0
    n = len(importance)
    targets = {
        name: 0 if share < min_share / n else max(1, pow2_round(cap * share / top))
        for name, share in importance.items()
    }
    return cap, targets


def plan_ranks(
    cost: RankCost,
    importance: dict[str, float],
    complexity: float,
    budget: int,
    batch_size: int,
    max_rank: int = 16,
    min_share: float = 0.1,
    recompute: bool = False,
    allow_recompute: bool = False,
    allow_batch_reduce: bool = False,
    safety_margin: float = 0.0,
    uniform: bool = False,
    allow_quantize: bool = False,
    quantize_with: MemoryContribution | None = None,
) -> Plan:
    """Greedy doubling in importance order under (1 - safety_margin) x budget; raises UserError naming
    the smallest budget that would fit. `quantize_with`: what the quant method's `plan_for` says a
    quantised base saves (default: `RankCost.quantized_base`'s 4-bit NF4 estimate)."""
    limit = budget * (1 - safety_margin) * (1 + 1e-12)  # a budget the error message names must fit

    order = sorted(importance, key=lambda n: (-importance[n], n))
    cap, targets = targets_from_importance(importance, complexity, max_rank, min_share, uniform)
    minimal = {n: 0 for n in order}
    minimal[order[0]] = 1  # a PEFT adapter needs at least one LoRA layer
    targets[order[0]] = max(targets[order[0]], 1)
    allowed = {"recompute": allow_recompute, "quantize": allow_quantize, "batch_reduce": allow_batch_reduce}
    fit = _fit_smallest_plan(cost, minimal, batch_size, recompute, limit, allowed, quantize_with)
    if fit.cost.total(minimal, fit.batch, fit.recompute) > limit:
        _refuse_budget(fit, minimal, order[0], budget, safety_margin, allowed)
    ranks, blocked = _grow_ranks(fit, minimal, order, targets, limit, limit_name(budget, safety_margin))
    layers = _explain_layers(fit, importance, order, ranks, targets, blocked, cap, min_share, uniform)
    estimate = fit.cost.breakdown(ranks, fit.batch, fit.recompute)
    return Plan(
        budget,
        fit.batch,
        fit.recompute,
        complexity,
        cap,
        estimate,
        layers,
        fit.changes,
        safety_margin,
        fit.quantize,
    )


@dataclass
class _Fit:
    """Where the levers left the smallest plan: the cost model (quantised or not), batch, recomputation,
    whether a 4-bit base was possible at all, and the changes made, in the order they were made."""

    cost: RankCost
    batch: int
    recompute: bool
    quantize: bool
    can_quantize: bool
    changes: list[str]


def _fit_smallest_plan(
    cost: RankCost,
    minimal: dict[str, int],
    batch: int,
    recompute: bool,
    limit: float,
    allowed: dict[str, bool],
    quantize_with: MemoryContribution | None,
) -> _Fit:
    """Pull the allowed levers, cheapest loss first (recomputation, then a 4-bit base, then halving the
    batch), only while the smallest useful plan does not fit: each costs speed or quality."""
    changes: list[str] = []
    if cost.total(minimal, batch, recompute) > limit and allowed["recompute"] and not recompute:
        before = cost.breakdown(minimal, batch, False)["activations"]
        recompute = True
        after = cost.breakdown(minimal, batch, True)["activations"]
        changes.append(f"recomputation on: activations {fmt_bytes(before)} -> {fmt_bytes(after)}")
    quantize = False
    quantized = cost.quantized_base(quantize_with)
    can_quantize = quantized.weight_saving > 0
    if cost.total(minimal, batch, recompute) > limit and allowed["quantize"] and can_quantize:
        quantize, before = True, cost.breakdown(minimal, batch, recompute)["weights"]
        cost = quantized
        after = cost.breakdown(minimal, batch, recompute)["weights"]
        changes.append(
            f"{quantized.contribution.note or 'quantised base'}: weights {fmt_bytes(before)} -> "
            f"{fmt_bytes(after)}"
        )
    while cost.total(minimal, batch, recompute) > limit and allowed["batch_reduce"] and batch > 1:
        changes.append(f"batch size {batch} -> {batch // 2}")
        batch //= 2
    return _Fit(cost, batch, recompute, quantize, can_quantize, changes)


def _refuse_budget(
    fit: _Fit, minimal: dict[str, int], top: str, budget: int, safety_margin: float, allowed: dict[str, bool]
) -> None:
    """The one-line refusal: what the smallest plan is, the budget it needs, and the levers not allowed."""
    from leantune.errors import UserError

    need = math.ceil(fit.cost.total(minimal, fit.batch, fit.recompute) / (1 - safety_margin))
    what = f"rank 1 on {top} only, batch {fit.batch}" + (", recomputation on" if fit.recompute else "")
    what += ", 4-bit base" if fit.quantize else ""
    not_allowed = [
        lever
        for lever, off in (
            ("recomputation", not allowed["recompute"]),
            ("a 4-bit base", not allowed["quantize"] and fit.can_quantize),
            ("a smaller batch", not allowed["batch_reduce"]),
        )
        if off
    ]
    more = f", or allow {' and '.join(not_allowed)}" if not_allowed else ""
    raise UserError(
        f"memory budget {fmt_bytes(budget)} is too small: the smallest plan ({what}) needs "
        f"{fmt_bytes(need)} ({need} bytes{margin_note(safety_margin)}): raise the budget to at least "
        f"that{more}"
    )


def _grow_ranks(
    fit: _Fit,
    minimal: dict[str, int],
    order: list[str],
    targets: dict[str, int],
    limit: float,
    limit_text: str,
) -> tuple[dict[str, int], dict[str, str]]:
    """Double each layer's rank towards its target, most important first, in rounds, while the whole
    step fits; a layer whose next doubling does not fit stops there, and the reason is kept."""
    ranks = dict(minimal)
    blocked: dict[str, str] = {}
    grew = True
    while grew:
        grew = False
        for name in order:
            if ranks[name] >= targets[name] or name in blocked:
                continue
            nxt = 1 if ranks[name] == 0 else min(2 * ranks[name], targets[name])
            trial = {**ranks, name: nxt}
            need = fit.cost.total(trial, fit.batch, fit.recompute)
            if need <= limit:
                ranks, grew = trial, True
            else:
                blocked[name] = f"{ranks[name]}->{nxt} would need {fmt_bytes(need)} > {limit_text}"
    return ranks, blocked


def _explain_layers(
    fit: _Fit,
    importance: dict[str, float],
    order: list[str],
    ranks: dict[str, int],
    targets: dict[str, int],
    blocked: dict[str, str],
    cap: int,
    min_share: float,
    uniform: bool,
) -> list[LayerPlan]:
    """One LayerPlan per layer, in model order, each with the reason for its rank."""
    position = {n: i + 1 for i, n in enumerate(order)}
    layers = []
    for name in fit.cost.layers:
        imp, r, t = importance[name], ranks[name], targets[name]
        head = f"importance #{position[name]} of {len(order)} (share {imp:.3f})"
        if t == 0:
            why = f"rank 0: {head} below the cutoff {min_share:.2f}/{len(order)}"
        elif name in blocked:
            why = f"rank {r} (target {t}): {head}; {blocked[name]}"
        else:
            rule = f"uniform target = cap {cap}" if uniform else f"target {t} = cap {cap} x share / top share"
            why = f"rank {r}: {head}; {rule}, fits in budget"
        bytes_ = fit.cost.lora_param_bytes(name, r) + fit.cost.rank_activation_bytes(name, r, fit.batch)
        layers.append(LayerPlan(name, imp, t, r, bytes_, why))
    return layers


def margin_note(safety_margin: float) -> str:
    return f", with the {safety_margin:.0%} safety margin" if safety_margin else ""


def limit_name(budget: int, safety_margin: float) -> str:
    if not safety_margin:
        return f"budget {fmt_bytes(budget)}"
    return f"{1 - safety_margin:.2f} x budget {fmt_bytes(budget)} = {fmt_bytes(budget * (1 - safety_margin))}"
