"""Which linear layers of a model a quantised base replaces, and what their packed weights cost.

Below the methods because two layers need the same answer: the `quant` method replaces exactly these
layers, and the memory planner prices a 4-bit base from them (through `quant`'s `plan_for` hook, or the
same defaults when none is given) without importing a method. torch/transformers are imported lazily.
"""

from __future__ import annotations

# The task head, the pooler and the LM head stay trainable or tied to the embeddings; embeddings are
# not linear layers.
NEVER_QUANTIZED = ("classifier", "score", "classification_head", "pooler", "lm_head")


def skipped(name: str, skip: tuple[str, ...]) -> bool:
    """`name` is one of `skip`, or has one of them as a path component or dotted suffix."""
    parts = name.split(".")
    return any(s in parts or name == s or name.endswith("." + s) for s in skip)


def quantizable_layers(model, skip: tuple[str, ...]) -> list[str]:
    """Names of the plain linear layers (nn.Linear, GPT-2's Conv1D) outside `skip`."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if type(m) in (nn.Linear, Conv1D) and not skipped(n, skip)]


def frozen_linear_weights(
    model, skip_ids: set[int] | frozenset[int] = frozenset(), skip: tuple[str, ...] = NEVER_QUANTIZED
) -> tuple[int, int]:
    """(bytes, count) of the frozen weights a quantised base would replace: the `quantizable_layers`
    (an already quantised layer is no longer a Linear), less `skip_ids`, anything trainable, and
    weights already stored in under 2 bytes."""
    nbytes = numel = 0
    for name in quantizable_layers(model, skip):
        weight = model.get_submodule(name).weight
        if id(weight) in skip_ids or weight.requires_grad or weight.element_size() < 2:
            continue
        nbytes += weight.numel() * weight.element_size()
        numel += weight.numel()
    return nbytes, numel


def packed_bytes_per_weight(bits: int = 4, blocksize: int = 64, double_quant: bool = True) -> float:
    """Bytes a quantised weight takes with its scales: the codes, plus per block of `blocksize` an
    absmax (8-bit with double quantisation, which adds an fp32 scale per 256 absmaxes; else fp32)."""
    scales = 1 / blocksize + 4 / (blocksize * 256) if double_quant and bits == 4 else 4 / blocksize
    return bits / 8 + scales
