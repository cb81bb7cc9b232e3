"""The epoch order: seeded, complete, sharded evenly, and length-grouped on request."""

from __future__ import annotations

import random

import pytest

from leantune.train.batching import epoch_batches

LENGTHS = [random.Random(i).randint(4, 64) for i in range(1000)]


def _padded_tokens(batches: list[list[int]]) -> int:
    return sum(max(LENGTHS[i] for i in b) * len(b) for b in batches)


@pytest.mark.parametrize("grouped", [False, True])
def test_every_example_once_per_epoch_and_seeded(grouped):
    batches = epoch_batches(LENGTHS, 32, seed=0, epoch=0, group_by_length=grouped)
    assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))
    assert batches == epoch_batches(LENGTHS, 32, seed=0, epoch=0, group_by_length=grouped)
    assert batches != epoch_batches(LENGTHS, 32, seed=0, epoch=1, group_by_length=grouped)
    assert batches != epoch_batches(LENGTHS, 32, seed=1, epoch=0, group_by_length=grouped)


def test_grouping_cuts_padding_but_keeps_batches_shuffled():
    plain = epoch_batches(LENGTHS, 32, seed=0, epoch=0)
    grouped = epoch_batches(LENGTHS, 32, seed=0, epoch=0, group_by_length=True)
    assert _padded_tokens(grouped) < 0.7 * _padded_tokens(plain)
    longest = [max(LENGTHS[i] for i in b) for b in grouped]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


@pytest.mark.parametrize("grouped", [False, True])
def test_ranks_get_equal_disjoint_shards(grouped):
    shards = [
        epoch_batches(LENGTHS[:999], 16, 0, 0, rank=r, world=2, group_by_length=grouped) for r in (0, 1)
    ]
    flat = [sorted(i for b in s for i in b) for s in shards]
    assert len(flat[0]) == len(flat[1]) == 500  # 999 padded to 1000 by repeating one example
    assert set(flat[0]) | set(flat[1]) == set(range(999))
    assert len(shards[0]) == len(shards[1])
