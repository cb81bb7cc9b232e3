"""The order of the training data: a permutation per epoch, seeded by (seed, epoch), sharded by rank.

Because the order of epoch e depends on nothing but (seed, e), a checkpoint only has to remember the
epoch and the position in it to resume exactly, on any number of restarts.

`group_by_length` is the classic speed lever for dynamic padding (transformers' LengthGroupedSampler does
the same): within mega-batches of `MEGA` batches of the shuffled order, examples are sorted by length so
that each batch pads to a similar length, and the batches are then shuffled again so that training does
not see lengths in order. The model sees the same examples each epoch, in batches of more uniform length.
"""

from __future__ import annotations

import torch

MEGA = 50  # batches per sorted window: large enough to group lengths, small enough to stay random


def epoch_batches(
    lengths: list[int],
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world: int = 1,
    group_by_length: bool = False,
) -> list[list[int]]:
    """This rank's batches (lists of example indices) for `epoch`."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    order += order[: (-len(order)) % world]  # equal shards, or DDP ranks would wait on each other
    mine = order[rank::world]
    if group_by_length:
        window = batch_size * MEGA
        mine = [
            i
            for s in range(0, len(mine), window)
            for i in sorted(mine[s : s + window], key=lambda i: -lengths[i])
        ]
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    if group_by_length:
        perm = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[i] for i in perm]
    return batches
