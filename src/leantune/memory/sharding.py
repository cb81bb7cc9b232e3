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
  shards) are a floor of every rank's peak, unless they are memory-mapped (below). The per-rank peak
  is max(load, training, evaluation).
- On CPU a training process also builds ~`CPU_RUNTIME_BYTES` of its own on its first steps (Python
  objects, autograd and dispatcher state, small allocations on the heap), whatever the model's size:
  measured as the RSS growth of a one-process LoRA run of a 44 MB BERT beyond its weights and
  activations. It is added on CPU only: on a GPU the peak is `torch.cuda.max_memory_allocated`, tensors
  only. An FSDP rank holds ~15 MiB more of its own (FSDP2's parameter-group state and DTensor metadata,
  the gloo communicator): measured on the 2-rank runs of an 11M-parameter BERT (full and LoRA) as what
  their peaks exceeded the model above; `CPU_FSDP_RUNTIME_BYTES`.

Three mechanisms beyond the step itself (found on SmolLM2-135M, whose 1- and 2-process predictions were
off by up to 26%; benchmarks/results/scale-out/ and docs/distributed.md):
- Tied weights: a causal LM whose output head is its input embedding uses that weight twice, so backward
  makes its gradient twice: the head's contribution first (held as `.grad` through the whole backward),
  then the embedding's, allocated whole before AccumulateGrad adds it in. At the end of backward the
  tied weights' whole gradient therefore exists twice (`tied_gradients`), under FSDP beside the root's
  gathered weights.
- Memory-mapped weights: transformers loads a safetensors checkpoint of the same dtype as views of the
  mapped file, so a weight is resident (RSS) only once read. In one process the first forward reads
  them all; under FSDP sharding reads only this rank's rows of each tensor (dim-0 chunks) and copies
  them, so the load peak is twice the shards, not the whole model plus the shards. `mapped_params`
  tells which parameters sit in a file mapping (/proc/self/maps), as the run will load them.
- Evaluation: after training the run evaluates the validation and test splits at `eval.batch_size`
  rows per pass (each rank its share). Gradients are gone, the optimizer state stays, and under FSDP
  the root unit stays gathered (a forward without backward does not reshard it); a causal LM then holds
  its logits and their log-softmax whole (rows x sequence x vocabulary float32 each), traced as a
  no-grad forward (`estimate.eval_forward_bytes`). With SmolLM2's 49k vocabulary and 32 evaluation rows
  that is ~400 MiB, more than a LoRA step.

Five moments compete for the per-rank peak: four of the training step (see `MemoryEstimate.step_bytes` for
the one-process reasoning): the root's all-gather at the start of forward (FSDP), the start of backward (all
activations saved, the root and two blocks gathered), the end of backward (under FSDP the root's whole
weights and gradients while its backward runs, then, resharded, its gradients and their reduce-scatter copy
beside the sharded ones), and the optimizer update (every gradient alive plus AdamW's temporaries); the
fifth is the evaluation pass. The measured side subtracts the shared libraries' code pages that the first
step pages in (`leantune.memory.budget.library_rss`), which are not the model's memory.
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
    load: int  # what loading holds: the whole model, or (FSDP) the read rows of mapped weights + shards
    runtime: int  # CPU_RUNTIME_BYTES on CPU, 0 on a GPU
    tied_gradients: int = 0  # tied trainable weights: their second gradient at the end of backward
    eval_forward: int = 0  # the evaluation pass's forward peak (0: the run does not evaluate)
    eval_batch_per_rank: int = 0
    eval_seq_len: int = 0

    @property
    def moments(self) -> dict[str, int]:
        base = self.weights + self.optimizer_state + self.ddp_buckets
        moments = {"root_gather": base + self.root_gather} if self.mode == "fsdp" else {}
        evaluation = {"eval": base + self.gathered_weights + self.eval_forward} if self.eval_forward else {}
        return {
            **moments,
            "backward_start": base + self.gathered_weights + self.activations + self.transient,
            "backward_end": base + self.gradients + self.backward_end_root,
            "update": base + self.gradients + self.optimizer_transient,
            **evaluation,
        }

    @property
    def backward_end_root(self) -> int:
        """The root at the end of backward: its whole weights and gradients while its backward runs (a
        tied weight's second gradient beside them), then (FSDP2 reshards before it reduces) the
        gradients and their reduce-scatter copy. One process: the tied weights' second gradient."""
        if self.mode != "fsdp":
            return self.tied_gradients
        whole = self.root_weights + self.gathered_root_gradients // 2 + self.tied_gradients
        return max(whole, self.gathered_root_gradients)

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

    @property
    def peak_phase(self) -> str:
        """`load`, `train` or `eval`: the phase of the run that sets the peak."""
        return self.peak_at if self.peak_at in ("load", "eval") else "train"

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "moments": self.moments,
            "training": self.training,
            "total": self.total,
            "peak_at": self.peak_at,
            "peak_phase": self.peak_phase,
        }


def shard_bytes(p, world: int) -> int:
    """This rank's bytes of `p` under FSDP2: dim 0 cut in `world` chunks, each padded to the largest."""
    if p.ndim == 0:
        return p.element_size()
    rows = p.shape[0]
    return math.ceil(rows / world) * (p.numel() // max(rows, 1)) * p.element_size()


def tied_trainable_bytes(model) -> int:
    """Bytes of trainable parameters that more than one module holds (a causal LM's input embeddings
    tied to its output head): each use sends backward its own whole gradient (see the module docstring)."""
    uses: dict[int, tuple] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen_p, n = uses.get(id(p), (p, 0))
        uses[id(p)] = (seen_p, n + 1)
    return sum(p.numel() * p.element_size() for p, n in uses.values() if n > 1 and p.requires_grad)


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's file-backed memory mappings; empty where /proc is missing."""
    from pathlib import Path

    spans = []
    try:
        text = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end))
    return spans


def mapped_params(params: list) -> set[int]:
    """ids of the parameters whose storage lies in a file mapping (a safetensors checkpoint loaded as
    views of the mapped file): resident only once read (see the module docstring)."""
    import bisect

    spans = sorted(_file_mappings())
    starts = [s for s, _ in spans]
    out = set()
    for p in params:
        if p.device.type != "cpu":
            continue
        ptr = p.untyped_storage().data_ptr()
        i = bisect.bisect_right(starts, ptr) - 1
        if i >= 0 and ptr < spans[i][1]:
            out.add(id(p))
    return out


def unread_embedding_bytes(model, token_ids: frozenset[int] | None, mapped: set[int]) -> int:
    """Bytes of a frozen, memory-mapped input embedding that one process never reads: a lookup reads
    the rows of the tokens the data holds, and the kernel makes resident only the pages (of
    `resource.getpagesize()` bytes) those rows lie on. Not when the embedding is trainable (AdamW writes
    every row), tied to the output head (which reads every row) or not mapped (loaded as a copy).
    Fault-around may map up to 64 KiB around a fault where the file is in the page cache: the
    one-process MiniLM LoRA run measured the pages of the rows read (docs/distributed.md)."""
    import resource

    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(embedding, "weight", None)
    if token_ids is None or w is None or w.requires_grad or id(w) not in mapped or w.ndim != 2:
        return 0
    if sum(q is w for _, q in model.named_parameters(remove_duplicate=False)) > 1 or _tied(model, w):
        return 0  # another module reads it whole
    page, row = resource.getpagesize(), w.shape[1] * w.element_size()
    start = w.untyped_storage().data_ptr() + w.storage_offset() * w.element_size()
    pages = set()
    for i in token_ids:
        if 0 <= i < w.shape[0]:
            first = start + i * row
            pages.update(range(first // page, (first + row - 1) // page + 1))
    return max(0, _nbytes([w]) - len(pages) * page)


def _tied(model, w) -> bool:
    """`w` is also the output head's weight."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return getattr(head, "weight", None) is w


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


def rank_memory(
    model, estimate: MemoryEstimate, world_size: int, mode: str, token_ids: frozenset[int] | None = None
) -> RankMemory:
    """Per-rank bytes of training `model` (methods applied) on `world_size` processes in `mode`;
    `estimate` is the one-process memory model at the per-rank batch (activations, transients) and,
    where the run evaluates, at the per-rank evaluation batch (`estimate.eval_bytes`). `token_ids`: the
    distinct token ids of the data (`unread_embedding_bytes`); None counts every weight as read."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    optimizer = estimate.optimizer
    slots, steps = OPTIMIZER_SLOTS[optimizer], ADAM_STEP_BYTES if optimizer == "adamw" else 0
    params = _distinct(model)
    trainable = [p for p in params if p.requires_grad]
    full_weights = _nbytes(params)
    mapped = mapped_params(params)
    unread = unread_embedding_bytes(model, token_ids, mapped) if mode == "none" else 0
    common = {
        "world_size": world_size,
        "mode": mode,
        "batch_per_rank": estimate.batch_size,
        "seq_len": estimate.seq_len,
        "activations": estimate.activation_bytes,
        "transient": estimate.transient_bytes,
        "load": full_weights,
        "runtime": 0 if _on_gpu() else CPU_RUNTIME_BYTES,
        "tied_gradients": tied_trainable_bytes(model),
        "eval_forward": estimate.eval_bytes,
        "eval_batch_per_rank": estimate.eval_batch,
        "eval_seq_len": estimate.eval_seq_len,
    }
    if mode != "fsdp":
        grads = _nbytes(trainable)
        return RankMemory(
            **{**common, "load": full_weights - unread},
            weights=full_weights - unread,
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
    read = sum(shard_bytes(p, world_size) if id(p) in mapped else _nbytes([p]) for p in params)
    return RankMemory(
        # the shards are copied (from the rows read of a mapped weight) before the whole goes; FSDP's own
        # state comes on top of the CPU runtime
        **{**common, "load": read + weights, "runtime": common["runtime"] and CPU_FSDP_RUNTIME_BYTES},
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
