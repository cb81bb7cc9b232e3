"""Change the rank of one peft LoRA layer in place: shrink by SVD truncation, grow with zero columns,
drop to rank 0, and keep peft's config in step so `save_pretrained` writes a `rank_pattern` adapter.

peft can create an adapter at a rank but not resize one, and AdaLoRA's masking keeps the full-rank
tensors (and their optimizer state) allocated; resizing the factors themselves is what frees memory.

The layer's `scaling` is kept fixed across resizes (so a resize never rescales what was learned); the
saved `alpha_pattern` is set to scaling * rank so peft rebuilds the same scaling when it loads.
Rank 0 removes the adapter from that layer (peft's forward skips a layer without `lora_A[adapter]`):
no parameters, no dropout, no saved activations. Finding the layers and reading their ranks is
`leantune.models.lora_sites` (the memory planner needs it too); this module re-exports it.
"""

from __future__ import annotations

import math
from typing import Any

from leantune.models.lora_sites import ADAPTER, lora_factors, lora_layers, rank_of

__all__ = [
    "ADAPTER",
    "grow_zero",
    "lora_factors",
    "lora_layers",
    "rank_of",
    "resize",
    "set_factors",
    "svd_truncate",
    "sync_peft_config",
]


def _linear(weight, requires_grad: bool):
    """An nn.Linear around `weight`, built on the meta device so no random init consumes the RNG."""
    import torch
    from torch import nn

    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=False, device="meta")
    lin.weight = nn.Parameter(weight.contiguous(), requires_grad=requires_grad)
    del lin.bias
    lin.register_parameter("bias", None)
    lin.to(torch.device(weight.device))
    return lin


def set_factors(layer, a, b, adapter: str = ADAPTER) -> None:
    """Install new factors (or remove the adapter when `a` is None) and record the rank."""
    if a is None:
        if adapter in layer.lora_A:
            del layer.lora_A[adapter]
            del layer.lora_B[adapter]
        layer.r[adapter] = 0
        return
    train = layer.lora_A[adapter].weight.requires_grad if adapter in layer.lora_A else True
    layer.lora_A[adapter] = _linear(a, train)
    layer.lora_B[adapter] = _linear(b, train)
    layer.r[adapter] = int(a.shape[0])
    layer.lora_alpha[adapter] = layer.scaling[adapter] * int(a.shape[0])


def svd_truncate(a, b, k: int):
    """Best rank-k factors of B A (Eckart-Young) and the discarded singular values of B A.

    Works on r x r matrices only: B = Qb Rb and A^T = Qa Ra, so B A = Qb (Rb Ra^T) Qa^T and the SVD of
    the small core gives the SVD of the product. The new A is the top-k right singular vectors scaled to
    the old A's RMS row norm, and B takes the singular values. Why not split sqrt(s) evenly: under Adam
    each entry moves ~lr per step, so how fast B A moves scales with the factors' norms. Early in
    training B is near zero and s is small; an even split would shrink A to sqrt(s) and slow that
    layer's learning several-fold after every shrink. Keeping A at the scale LoRA initialised it with
    keeps the layer's pace.
    """
    import torch

    with torch.no_grad():
        qb, rb = torch.linalg.qr(b.double())
        qa, ra = torch.linalg.qr(a.double().T)
        u, s, vh = torch.linalg.svd(rb @ ra.T)
        scale = a.double().norm() / math.sqrt(a.shape[0])
        scale = scale if scale > 0 else torch.ones((), dtype=torch.float64)
        new_b = (qb @ u[:, :k]) * (s[:k] / scale)
        new_a = scale * (vh[:k] @ qa.T)
        return new_a.to(a.dtype), new_b.to(b.dtype), s[k:].to(a.dtype)


def grow_zero(a, b, k: int, generator):
    """k-rank factors holding the same product: new rows of A drawn as peft initialises A (kaiming
    uniform), new columns of B zero, so B A and the layer's output are unchanged."""
    import torch

    r, in_f = a.shape
    bound = 1.0 / math.sqrt(in_f)
    extra = (torch.rand(k - r, in_f, generator=generator, dtype=torch.float32) * 2 - 1) * bound
    new_a = torch.cat([a.detach(), extra.to(a.dtype).to(a.device)], 0)
    new_b = torch.cat([b.detach(), torch.zeros(b.shape[0], k - r, dtype=b.dtype, device=b.device)], 1)
    return new_a, new_b


def resize(layer, k: int, generator, adapter: str = ADAPTER) -> dict[str, Any]:
    """Set the layer's rank to k; returns what happened (kind, old rank, discarded singular values)."""
    import torch

    old = rank_of(layer, adapter)
    if k == old:
        return {"kind": "same", "from": old, "to": k}
    if k == 0:
        a, b = lora_factors(layer, adapter)
        s = torch.linalg.svdvals(b.detach().double() @ a.detach().double()).to(a.dtype)
        set_factors(layer, None, None, adapter)
        return {"kind": "drop", "from": old, "to": 0, "discarded": s[:old].tolist()}
    if old == 0:
        base = layer.get_base_layer()
        a = torch.zeros(0, base.in_features, dtype=torch.float32, device=base.weight.device)
        b = torch.zeros(base.out_features, 0, dtype=torch.float32, device=base.weight.device)
        if adapter not in layer.scaling:
            raise RuntimeError("layer has no scaling for the adapter")
        new_a, new_b = grow_zero(a, b, k, generator)
        set_factors(layer, new_a, new_b, adapter)
        return {"kind": "grow", "from": 0, "to": k}
    a, b = lora_factors(layer, adapter)
    if k < old:
        new_a, new_b, discarded = svd_truncate(a.detach(), b.detach(), k)
        set_factors(layer, new_a, new_b, adapter)
        return {"kind": "shrink", "from": old, "to": k, "discarded": discarded.tolist()}
    new_a, new_b = grow_zero(a, b, k, generator)
    set_factors(layer, new_a, new_b, adapter)
    return {"kind": "grow", "from": old, "to": k}


def sync_peft_config(model, adapter: str = ADAPTER) -> dict[str, int]:
    """Make peft's config describe the live ranks: explicit targets (rank > 0), rank and alpha patterns."""
    ranks = {name: rank_of(layer, adapter) for name, layer in lora_layers(model).items()}
    live = {n: r for n, r in ranks.items() if r > 0}
    if hasattr(model, "peft_config"):
        cfg = model.peft_config[adapter]
        layers = lora_layers(model)
        cfg.target_modules = set(live)
        cfg.rank_pattern = dict(live)
        cfg.alpha_pattern = {n: float(layers[n].scaling[adapter] * r) for n, r in live.items()}
        if live:  # the defaults peft falls back on; every live layer has its own pattern entry anyway
            top = max(live, key=live.get)
            cfg.r, cfg.lora_alpha = live[top], cfg.alpha_pattern[top]
    return ranks
