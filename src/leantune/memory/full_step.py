"""Peak memory of one step for methods that change *how* the step runs, not what is trainable: AdamW
backprop (the reference), a fused backward that applies and frees each gradient inside backward (LOMO,
AdaLomo) and a forward-only step (MeZO). Each method says which with its `plan_for` hook
(`MemoryContribution.step`, the gradients and optimizer state it removes or adds, and its own update's
transient bytes); this module never names a method.

- backprop: `estimate_memory(..., "adamw")` (estimate.py): weights, state, then the larger of the
  backward peak (saved activations + transients) and the update peak (every gradient + AdamW's
  temporaries).
- fused_backward: the peak of a forward + backward pass whose gradients are dropped the moment each is
  complete, traced with `LiveBytes` (memory/live.py) at batches 1 and 2 and extrapolated linearly, plus
  the state the method keeps and its update's own temporaries (`transient`).
- forward_only: nothing is saved for backward: the peak of a no-grad forward pass, traced the same
  way, plus the update's own transient (MeZO's z chunks).

Why traced rather than the saved-tensor model of estimate.py: that model's backward transients
(`TRANSIENT_FACTOR`) were fitted to process RSS with AdamW; a fused backward's peak is where one
gradient and the backward's buffers meet, which the trace sees directly (15% checked in
tests/test_memory_full_step.py).
"""

from __future__ import annotations

from typing import Any

from leantune.memory.contribution import MemoryContribution
from leantune.memory.estimate import estimate_memory, probe_batch

STEP_KINDS = ("backprop", "fused_backward", "forward_only")


def _traced_peak(model, task: str, seq_len: int, batch_size: int, backward: bool) -> int:
    """Peak bytes allocated (weights excluded) by one forward pass, and with `backward` a backward pass
    whose gradients are dropped as soon as each is complete, with the graph retained as the first pass
    of a fused step's two-pass clipping (on by default) retains it. What the method's own update
    allocates besides is its `MemoryContribution.transient`."""
    import torch

    from leantune.memory.live import LiveBytes

    batch = probe_batch(model, task, batch_size, seq_len)
    was_training = model.training
    model.train(backward)
    hooks = []
    if backward:

        def drop(p) -> None:
            p.grad = None

        hooks = [p.register_post_accumulate_grad_hook(drop) for p in model.parameters() if p.requires_grad]
    try:
        with torch.random.fork_rng(devices=[]), LiveBytes() as live:
            if backward:
                model(**batch).loss.backward(retain_graph=True)  # a two-pass clipping keeps the graph
            else:
                with torch.no_grad():
                    model(**batch).loss.item()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return live.peak


def traced_step_peak(model, task: str, seq_len: int, batch_size: int, backward: bool) -> int:
    """`_traced_peak` at `batch_size`, extrapolated from batches 1 and 2: the part that scales with the
    batch (activations, logits) and the part that does not (one parameter's gradient) separate there."""
    one = _traced_peak(model, task, seq_len, 1, backward)
    two = _traced_peak(model, task, seq_len, 2, backward)
    return int(one + (two - one) * (batch_size - 1))


def step_estimate(
    model, task: str, batch_size: int, seq_len: int, contribution: MemoryContribution | None = None
) -> dict[str, Any]:
    """Bytes per component and the peak (`total`) of one step of the kind `contribution.step` names."""
    c = contribution or MemoryContribution()
    if c.step not in STEP_KINDS:
        raise ValueError(f"unknown step kind {c.step!r}; known: {', '.join(STEP_KINDS)}")
    base = estimate_memory(model, task, batch_size, seq_len, "adamw")
    weights = base.weight_bytes + c.weights
    grads = max(0, base.grad_bytes + c.gradients)
    state = max(0, base.optimizer_bytes + c.optimizer_state)
    if c.step == "backprop":
        activations, transient = base.activation_bytes, base.transient_bytes
        step = base.step_bytes + c.gradients + c.optimizer_state + c.transient
    else:  # traced: the saved activations, the backward's buffers and one live gradient, or a forward
        traced = traced_step_peak(model, task, seq_len, batch_size, backward=c.step == "fused_backward")
        activations, transient = traced, c.transient
        step = state + traced + c.transient
    return {
        "step_kind": c.step,
        "weights": weights,
        "gradients": grads,
        "optimizer_state": state,
        "activations": activations,
        "transient": transient,
        "step": int(step),
        "total": int(weights + step),
        "note": c.note,
    }
