"""Per-rank memory of data-parallel training: what one process of N holds under DDP or FSDP2.

The single-process memory model (`estimate.py`) counts weights, gradients, optimizer state and traced
activations. Across N processes (`train.batch_size` is per process, so activations stay per rank):

- `none` (one process): the single-process model.
- `ddp`: every rank holds the whole model, its gradients and AdamW's moments, plus DistributedDataParallel's
  gradient buckets: flat copies of every trainable gradient (accelerate's default
  `gradient_as_bucket_view=False`), allocated when the model is wrapped.
- `fsdp` (FSDP2 `fully_shard` per block, then the root, as `train.distributed.shard_model` does):
  parameters, gradients and optimizer state are sharded on dim 0, each tensor padded to
  ceil(rows / N) rows per rank. On top of the shards a step gathers whole units. While a unit is
  gathered FSDP2 holds it twice by design (the flat all-gather output and the unsharded parameters it is
  copied out into); over gloo on CPU we measured ~2.4 x the root unit at that moment
  (tests/test_fsdp.py::test_plan_predicts_the_per_rank_peak), so the model takes `FSDP_GATHER_FACTOR`
  = 2.5. The root unit (the embeddings, the head and whatever is outside the blocks) then stays
  gathered until the end of backward, beside up to two gathered blocks (the one running and the next
  one, prefetched in backward). At the end of backward FSDP2 reshards the root (frees its whole
  weights) and only then reduces: its whole gradients exist twice (the gradient and the reduce-scatter
  input) before they are scattered. So the embeddings of a small
  model, which are most of its weights, do not shrink with N at the peak.
- Loading: every rank loads the whole model before sharding (`load_model`, then `shard_model`, which
  copies this rank's shards before the whole tensors go), so the whole weights (plus, under FSDP, the
  shards) are a floor of every rank's peak. The per-rank peak is max(load, training).
- On CPU a training process also builds ~`CPU_RUNTIME_BYTES` of its own on its first steps (Python
  objects, autograd and dispatcher state, small allocations on the heap), whatever the model's size:
  measured as the RSS growth of a one-process LoRA run of a 44 MB BERT beyond its weights and
  activations. It is added on CPU only: on a GPU the peak is `torch.cuda.max_memory_allocated`, tensors
  only. An FSDP rank holds ~15 MiB more of its own (FSDP2's parameter-group state and DTensor metadata,
  the gloo communicator): measured on the 2-rank runs of an 11M-parameter BERT (full and LoRA) as what
  their peaks exceeded the model above; `CPU_FSDP_RUNTIME_BYTES`.

Four moments of a step compete for the training peak (see `MemoryEstimate.step_bytes` for the
one-process reasoning): the root's all-gather at the start of forward (FSDP), the start of backward (all
activations saved, the root and two blocks gathered), the end of backward (under FSDP the root's whole
weights and gradients while its backward runs, then, resharded, its gradients and their reduce-scatter
copy beside the sharded ones), and the optimizer update (every
gradient alive plus AdamW's temporaries). The measured side subtracts the shared libraries' code pages
that the first step pages in (`leantune.memory.budget.library_rss`), which are not the model's memory.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from leantune.memory.estimate import (
    ADAM_STEP_BYTES,
    OPTIMIZER_SLOTS,
    OPTIMIZER_TRANSIENT_FACTOR,
    MemoryEstimate,
)

MODES = ("none", "ddp", "fsdp")
FSDP_GATHERED_BLOCKS = 2  # the block running and the next one, prefetched in backward
FSDP_GATHER_FACTOR = 2.5  # a unit held while it is all-gathered, in units of its whole size (see above)
CPU_RUNTIME_BYTES = 16 * 2**20  # what a CPU training process adds on its first steps (see above)
CPU_FSDP_RUNTIME_BYTES = CPU_RUNTIME_BYTES + 15 * 2**20  # ... plus FSDP2's and gloo's own state (see above)


@dataclass
class RankMemory:
    """Bytes one rank of `world_size` holds; `total` is the predicted peak (the RSS growth on CPU since
    before the model was loaded, `torch.cuda.max_memory_allocated` on a GPU)."""

    world_size: int
    mode: str
    batch_per_rank: int
    seq_len: int
    weights: int
    gradients: int
    optimizer_state: int
    ddp_buckets: int
    activations: int
    transient: int
    gathered_weights: int  # FSDP: the root and the largest blocks, whole, during forward and backward
    root_gather: int  # FSDP: the root unit while it is all-gathered (FSDP_GATHER_FACTOR x its size)
    gathered_root_gradients: int  # FSDP: the root's whole gradients + their reduce-scatter copy
    root_weights: int  # FSDP: the root unit's whole weights (gathered while its own backward runs)
    optimizer_transient: int
    load: int  # the whole model, on every rank, before sharding
    runtime: int  # CPU_RUNTIME_BYTES on CPU, 0 on a GPU

    @property
    def moments(self) -> dict[str, int]:
        base = self.weights + self.optimizer_state + self.ddp_buckets
        moments = {"root_gather": base + self.root_gather} if self.mode == "fsdp" else {}
        return {
            **moments,
            "backward_start": base + self.gathered_weights + self.activations + self.transient,
            "backward_end": base + self.gradients + self.backward_end_root,
            "update": base + self.gradients + self.optimizer_transient,
        }

    @property
    def backward_end_root(self) -> int:
        """The root at the end of backward: its whole weights and gradients while its backward runs,
        then (FSDP2 reshards before it reduces) the gradients and their reduce-scatter copy."""
        return max(self.root_weights + self.gathered_root_gradients // 2, self.gathered_root_gradients)

    @property
    def training(self) -> int:
        return max(self.moments.values())

    @property
    def total(self) -> int:
        return max(self.load, self.training) + self.runtime

    @property
    def peak_at(self) -> str:
        if self.load >= self.training:
            return "load"
        moments = self.moments
        return max(moments, key=moments.__getitem__)

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "moments": self.moments,
            "training": self.training,
            "total": self.total,
            "peak_at": self.peak_at,
        }


def shard_bytes(p, world: int) -> int:
    """This rank's bytes of `p` under FSDP2: dim 0 cut in `world` chunks, each padded to the largest."""
    if p.ndim == 0:
        return p.element_size()
    rows = p.shape[0]
    return math.ceil(rows / world) * (p.numel() // max(rows, 1)) * p.element_size()


def _units(model) -> tuple[list[list], list]:
    """The parameters of each FSDP unit: one list per block of every block stack, and the root's rest."""
    from leantune.models.structure import block_stacks

    blocks = [list(block.parameters()) for _, stack in block_stacks(model) for block in stack]
    in_blocks = {id(p) for unit in blocks for p in unit}
    seen: set[int] = set()
    root = []
    for p in model.parameters():
        if id(p) not in in_blocks and id(p) not in seen:
            seen.add(id(p))
            root.append(p)
    return blocks, root


def _nbytes(params: list, trainable_only: bool = False) -> int:
    return sum(p.numel() * p.element_size() for p in params if p.requires_grad or not trainable_only)


def rank_memory(model, estimate: MemoryEstimate, world_size: int, mode: str) -> RankMemory:
    """Per-rank bytes of training `model` (methods applied) on `world_size` processes in `mode`;
    `estimate` is the one-process memory model at the per-rank batch (activations, transients)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    optimizer = estimate.optimizer
    slots, steps = OPTIMIZER_SLOTS[optimizer], ADAM_STEP_BYTES if optimizer == "adamw" else 0
    params = _distinct(model)
    trainable = [p for p in params if p.requires_grad]
    full_weights = _nbytes(params)
    common = {
        "world_size": world_size,
        "mode": mode,
        "batch_per_rank": estimate.batch_size,
        "seq_len": estimate.seq_len,
        "activations": estimate.activation_bytes,
        "transient": estimate.transient_bytes,
        "load": full_weights,
        "runtime": 0 if _on_gpu() else CPU_RUNTIME_BYTES,
    }
    if mode != "fsdp":
        grads = _nbytes(trainable)
        return RankMemory(
            **common,
            weights=full_weights,
            gradients=grads,
            optimizer_state=slots * grads + steps * len(trainable),
            ddp_buckets=grads if mode == "ddp" and world_size > 1 else 0,
            gathered_weights=0,
            root_gather=0,
            gathered_root_gradients=0,
            root_weights=0,
            optimizer_transient=estimate.optimizer_transient_bytes,
        )
    blocks, root = _units(model)
    grads = sum(shard_bytes(p, world_size) for p in trainable)
    largest_shard = max((shard_bytes(p, world_size) for p in trainable), default=0)
    block_sizes = sorted((_nbytes(unit) for unit in blocks), reverse=True)
    weights = sum(shard_bytes(p, world_size) for p in params)
    return RankMemory(
        # the shards are copied before the whole goes; FSDP's own state comes on top of the CPU runtime
        **{**common, "load": full_weights + weights, "runtime": common["runtime"] and CPU_FSDP_RUNTIME_BYTES},
        weights=weights,
        gradients=grads,
        optimizer_state=slots * grads + steps * len(trainable),
        ddp_buckets=0,
        gathered_weights=_nbytes(root) + sum(block_sizes[:FSDP_GATHERED_BLOCKS]),
        root_gather=int(FSDP_GATHER_FACTOR * _nbytes(root)),
        gathered_root_gradients=2 * _nbytes(root, trainable_only=True),
        root_weights=_nbytes(root),
        optimizer_transient=int(OPTIMIZER_TRANSIENT_FACTOR[optimizer] * largest_shard),
    )


def _distinct(model) -> list:
    seen: set[int] = set()
    out = []
    for p in model.parameters():
        if id(p) not in seen:  # tied weights count once
            seen.add(id(p))
            out.append(p)
    return out


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
