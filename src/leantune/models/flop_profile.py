"""What a training step of this model multiplies, recorded at train time for an honest FLOP count.

The bench computes achieved FLOP/s after the run from summary.json; by then the model is gone, and
guessing from method names which weights trained (and how far the backward pass reached) is wrong for
any method it does not know. So the run records, in logical weights (a packed 4-bit weight counts as
one), the parameters that do matrix multiplications and which part of them the backward pass touches:

- `embedding`: lookup tables (nn.Embedding), minus a tied output embedding (the LM head is a real matmul);
  `embedding_trainable`: whether the run trains them (a scatter-add, no matmul: kept out of the count).
- `matmul_total`: every other weight; the forward pass runs them all (2 FLOPs per weight per token).
- `matmul_backward`: the weights the activation gradient flows through: every block from the lowest one
  holding a trainable parameter upwards, plus what sits above the blocks (head, pooler, a decoder when
  the blocks found are an encoder's), and the embeddings' norm when something there trains. Nothing
  flows below the lowest trainable parameter.
- `matmul_trainable`: trainable weights other than lookup tables: they also get a weight gradient.
- `block_matmul`: weights per block, in order, so a run that skips blocks (a cached frozen prefix) can
  subtract exactly what it did not run; `below_blocks`: non-lookup weights under them (embeddings' norm).
"""

from __future__ import annotations

from typing import Any


def flop_profile(model) -> dict[str, Any]:
    from torch import nn

    from leantune.models.quantized import logical_numel
    from leantune.models.structure import embedding_modules, find_blocks

    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    outputs = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = outputs is not None and inputs is not None and outputs.weight is inputs.weight
    lookups = {
        id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding) and not (tied and m is inputs)
    }
    below = {id(p) for _, m in embedding_modules(model) for p in m.parameters()} - (
        {id(inputs.weight)} if tied else set()
    )
    try:
        _, blocks = find_blocks(model)
    except ValueError:
        blocks = nn.ModuleList()
    in_block = {id(p): i for i, b in enumerate(blocks) for p in b.parameters()}

    block_matmul = [0] * len(blocks)
    total = trainable = above = under = 0
    lowest = len(blocks)  # only what sits above the blocks trains: backward stops there
    embedding = 0
    embedding_trainable = False
    for p in model.parameters():
        n = logical_numel(p)
        if id(p) in lookups:
            embedding += n
            embedding_trainable |= p.requires_grad
        else:
            total += n
            trainable += n if p.requires_grad else 0
        if id(p) in in_block:
            block_matmul[in_block[id(p)]] += n
            if p.requires_grad:
                lowest = min(lowest, in_block[id(p)])
        elif id(p) in below:
            under += 0 if id(p) in lookups else n  # e.g. the embeddings' LayerNorm
            if p.requires_grad:
                lowest = -1  # trained below the blocks: the gradient flows through all of them
        elif id(p) not in lookups:
            above += n
    backward = above + sum(block_matmul[max(lowest, 0) :]) + (under if lowest < 0 else 0)
    return {
        "embedding": embedding,
        "embedding_trainable": embedding_trainable,
        "matmul_total": total,
        "matmul_backward": backward,
        "matmul_trainable": trainable,
        "block_matmul": block_matmul,
        "below_blocks": under,
    }


def flops_per_token(profile: dict[str, Any], skip_prefix: int = 0) -> float:
    """Model FLOPs per token of one training step, as bench/peak.py counts them: forward over the weights
    that run, activation gradients from the lowest trainable block up, weight gradients for trainable
    weights; with `skip_prefix`, the lowest blocks' forward (and the embeddings' norm) are served from a
    cache (`methods: auto` prices the frozen-prefix cache with it, recipes/auto.py)."""
    forward = profile["matmul_total"]
    if skip_prefix:
        forward -= sum(profile["block_matmul"][:skip_prefix]) + profile["below_blocks"]
    return 2.0 * forward + 2.0 * profile["matmul_backward"] + 2.0 * profile["matmul_trainable"]
