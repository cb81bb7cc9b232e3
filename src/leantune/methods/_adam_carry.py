"""Carry AdamW's moments across a LoRA rank change, into the new factors' coordinates.

Why not zero-pad or restart: torch's AdamW keeps one step count per tensor, so an entry that appears
with zero moments under an old step count t gets the bias correction of step t, not of its own first
step. Its first update is (1 - b1) / sqrt((1 - b2) / (1 - b2^t)) times the learning rate: 0.7x at
t = 50, 2.9x at t = 2,000 and 3.2x for long runs, and it keeps growing for a few steps after that. A
restarted state makes every resized layer take full sign-sized steps again, and it forgets the
direction it had.

The map: the layer learns W = B A. A resize sets A' = S A and B' = B T. For a shrink, both come from
the SVD of B A (S = A' A^+, T = B^+ B', least squares). For a grow, S = [I; 0] and T = [I, 0]; the new
rows of A are random and the new columns of B are zero. The chain rule gives
G_A' = B'^T G_W = T^T G_A and G_B' = G_W A'^T = G_B S^T. First moments are sums of past gradients, so
m_A' = T^T m_A and m_B' = m_B S^T. This is exact for a pure rotation (k = r), and it is what past
gradients would have summed to had the factors always been S A and B T.

Second moments are sums of squares and do not map linearly. Treating coordinates as independent gives
v_A' = (T^T)^2 v_A and v_B' = v_B (S^T)^2 (element-wise squares of the maps). An entry with no history
(its row of the map is zero, e.g. a grown column) gets the mean second moment of its factor as a prior,
so its first steps start small and ramp up instead of jumping.
"""

from __future__ import annotations

from typing import Any

MOMENTS = ("exp_avg", "exp_avg_sq")


def factor_maps(old_a, old_b, new_a, new_b, kind: str):
    """(S, T) with new_a ~ S old_a (k x r) and new_b ~ old_b T (r x k), in float64."""
    import torch

    k, r = new_a.shape[0], old_a.shape[0]
    if kind == "grow":
        eye = torch.eye(k, r, dtype=torch.float64, device=old_a.device)
        return eye, eye.T
    s = new_a.detach().double() @ torch.linalg.pinv(old_a.detach().double())
    t = torch.linalg.pinv(old_b.detach().double()) @ new_b.detach().double()
    return s, t


def _with_prior(v, old_v):
    """Entries left at zero (no history) take the factor's mean second moment."""
    prior = old_v.double().mean()
    return v.masked_fill(v == 0, prior.item()) if prior > 0 else v


def carry(state_a: dict[str, Any], state_b: dict[str, Any], maps) -> tuple[dict, dict]:
    """New AdamW states for A' and B' from the old factors' states and `factor_maps`' (S, T).

    The step count is kept (the moments are as old as before); other entries (e.g. max_exp_avg_sq of
    amsgrad, which this map cannot follow) are dropped, which restarts them."""
    s, t = maps
    if not state_a or not state_b or not all(m in state_a and m in state_b for m in MOMENTS):
        return {}, {}
    m_a, v_a = state_a["exp_avg"].double(), state_a["exp_avg_sq"].double()
    m_b, v_b = state_b["exp_avg"].double(), state_b["exp_avg_sq"].double()
    dtype = state_a["exp_avg"].dtype
    new_a = {
        "step": state_a["step"],
        "exp_avg": (t.T @ m_a).to(dtype),
        "exp_avg_sq": _with_prior(t.T.square() @ v_a, v_a).to(dtype),
    }
    new_b = {
        "step": state_b["step"],
        "exp_avg": (m_b @ s.T).to(dtype),
        "exp_avg_sq": _with_prior(v_b @ s.T.square(), v_b).to(dtype),
    }
    return new_a, new_b
