"""A cache of the frozen prefix's hidden states: later epochs start at the first block that trains.

When the embeddings and blocks 0..k-1 hold no trainable parameter (freeze-k, LoRA on upper blocks only,
the gradient-approximation encoder), the output of block k-1 for an example is the same every epoch. We
keep it, unpadded, in RAM the first time the example is trained on, and afterwards serve it instead of
running embeddings and blocks 0..k-1. No library does this for an arbitrary HF model inside our own loop
(transformers' KV cache is for generation; datasets' map-caching cannot see inside the model), hence
this module.

How: during a served micro-batch the embedding modules are swapped for stand-ins that return zeros of
the right shape (cheap), and blocks 0..k-1 for stand-ins returning the cached, re-padded batch in the
output structure the real block returns. Everything the model computes between (attention masks, Llama's
rotary embeddings from position ids) still runs on the real inputs. The swap happens only inside the
context of one training micro-batch; evaluation always runs the real model.

Exactness: with the flag on, the frozen-prefix modules (embeddings, blocks 0..k-1, and dropout modules
sitting next to the block list, like GPT-2's embedding dropout) run in eval mode in every training
micro-batch, cached or not, so dropout in the prefix is off. Otherwise a cached state would freeze one
dropout draw. Padded positions are filled with zeros when serving: attention masks keep them from
influencing real tokens, and the loss ignores them. The remaining difference to recomputing is float
summation order (~1e-7).

Memory: entries stay in RAM while their bytes fit `train.prefix_cache_ram`; later ones are appended to a
raw file in the run folder (`prefix_cache/rank<N>.bin`, one per process) and served as views of a memory
map of it, so serving copies them once, into the padded batch, exactly as from RAM. The file holds the
same bytes as the RAM tensor would, so a spilled entry serves the identical values. We write raw bytes
ourselves (not safetensors or numpy's .npy) because entries of varying length arrive one at a time and the
file must be appendable; bf16 has no numpy dtype, so the map is bytes viewed as the tensor's dtype. The
file is deleted when training ends (`close`); one a killed run left behind is truncated by the next run
(the cache is rebuilt after a resume, never checkpointed) or removed with the run folder's own names.

Unsupported: encoder-decoder models (their embeddings also feed the decoder) and peft prompt learning
(trainable virtual tokens enter before block 0); there the flag does nothing and the report says why.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from leantune.models.structure import embedding_modules, find_blocks

# The run-folder name (runfolder.OWN_NAMES) of the spill files, one per process.
SPILL_DIR = "prefix_cache"
# Tests switch this off to compare against the same eval-mode prefix computed every time.
SERVE_FROM_CACHE = True


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def frozen_prefix_depth(model: nn.Module) -> tuple[int, str]:
    """(k, why k is 0): the largest k with embeddings and blocks[0:k] free of trainable parameters."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return 0, "encoder-decoder models are not supported (their embeddings also feed the decoder)"
    peft_config = getattr(model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):
        return 0, "peft prompt learning puts trainable virtual tokens before the first block"
    if any(_trains(m) for _, m in embedding_modules(model)):
        return 0, "the embeddings have trainable parameters"
    _, blocks = find_blocks(model)
    k = 0
    while k < len(blocks) and not _trains(blocks[k]):
        k += 1
    return k, "" if k else "block 0 has trainable parameters"


def _outermost(named: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    names = [n for n, _ in named]
    return [(n, m) for n, m in named if not any(n.startswith(f"{o}.") for o in names if o != n)]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


class _Zeros(nn.Module):
    """Stands in for an embedding module: its output is ignored (the first block stand-in replaces it)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.shape, self.dtype, self.device = shape, dtype, device

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)


class _Cached(nn.Module):
    """Stands in for a frozen block: returns the cached output of block k-1, shaped like a block's output."""

    def __init__(self, hidden: torch.Tensor, tuple_len: int | None) -> None:
        super().__init__()
        self.hidden, self.tuple_len = hidden, tuple_len

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.tuple_len is None:
            return self.hidden
        return (self.hidden,) + (None,) * (self.tuple_len - 1)


class SpillFile:
    """Entries past the RAM bound: appended to one raw file, read back as views of a memory map of it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.index: dict[int, tuple[int, tuple[int, ...], torch.dtype]] = {}  # example -> offset, shape
        self.nbytes = 0
        self.tokens = 0
        self._file: BinaryIO | None = None  # opened at the first spill: no file when all fits in RAM
        self._map: np.memmap | None = None

    def __contains__(self, i: int) -> bool:
        return i in self.index

    def append(self, i: int, row: torch.Tensor) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "wb")  # noqa: SIM115 - held open for the run; "wb" truncates a stale one
        data = row.contiguous().view(torch.uint8).numpy()  # bytes, whatever the dtype (bf16 included)
        self._file.write(memoryview(data))
        self.index[i] = (self.nbytes, tuple(row.shape), row.dtype)
        self.nbytes += data.nbytes
        self.tokens += len(row)

    def get(self, i: int) -> torch.Tensor:
        offset, shape, dtype = self.index[i]
        size = int(np.prod(shape)) * dtype.itemsize
        if not size:
            return torch.empty(shape, dtype=dtype)
        if self._map is None or len(self._map) < offset + size:  # the file grew since the last map
            assert self._file is not None
            self._file.flush()
            # copy-on-write: the views are writable (torch wants that) and nothing reaches the file
            self._map = np.memmap(self.path, dtype=np.uint8, mode="c")
        return torch.from_numpy(self._map[offset : offset + size]).view(dtype).view(shape)

    def close(self) -> None:
        """Delete the file (and the folder once the last process's file is gone); the counts stay."""
        self._map = None
        self.index.clear()
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)
        with suppress(OSError):  # absent, or another process's file is still there
            self.path.parent.rmdir()


class PrefixCache:
    """Per-example hidden states after the frozen prefix; `micro_batch` wraps each training micro-batch.

    `ram_bytes` bounds the bytes kept in RAM (None: no bound); entries past it go to `spill_path`."""

    def __init__(
        self,
        model: nn.Module,
        verbose: bool = True,
        ram_bytes: int | None = None,
        spill_path: Path | None = None,
    ) -> None:
        if ram_bytes is not None and spill_path is None:
            raise ValueError("a RAM bound needs a spill_path for the entries past it")
        self.model = model
        self.k, self.reason = frozen_prefix_depth(model)
        self.states: dict[int, torch.Tensor] = {}  # the RAM part
        self.ram_bound = ram_bytes
        self.ram_used = 0  # bytes of self.states, kept as entries are added
        self.spill = SpillFile(spill_path) if spill_path is not None else None
        self._spilled = (0, 0, 0)  # the spill file's (examples, tokens, bytes) when `close` deleted it
        self.hits = self.misses = 0
        self.tokens_from_cache = 0  # tokens whose prefix blocks did not run (the bench's FLOP count)
        self._block_tuple_len: int | None = None
        self._embedding_out: dict[str, tuple[int, torch.dtype]] = {}
        if not self.k:
            if verbose:
                print(f"leantune: train.cache_frozen_prefix has no effect: {self.reason}", file=sys.stderr)
            return
        blocks_name, self.blocks = find_blocks(model)
        self.embeddings = _outermost(embedding_modules(model))
        backbone = model.get_submodule(blocks_name.rpartition(".")[0]) if "." in blocks_name else model
        dropouts = [m for m in backbone.children() if isinstance(m, nn.Dropout)]
        self.prefix = [m for _, m in self.embeddings] + list(self.blocks[: self.k]) + dropouts

    # -- the context around one training micro-batch ------------------------------------------------
    @contextmanager
    def micro_batch(self, idx: Sequence[int], attention_mask: torch.Tensor) -> Iterator[None]:
        if not self.k:
            yield
            return
        modes = [m.training for m in self.prefix]
        for m in self.prefix:
            m.train(False)
        try:
            if SERVE_FROM_CACHE and all(self._holds(i) for i in idx):
                self.hits += 1
                self.tokens_from_cache += int(attention_mask.sum())
                with self._serving(idx, attention_mask):
                    yield
            else:
                self.misses += 1
                with self._capturing(idx, attention_mask):
                    yield
        finally:
            for m, mode in zip(self.prefix, modes, strict=True):
                m.train(mode)

    @contextmanager
    def _capturing(self, idx: Sequence[int], attention_mask: torch.Tensor) -> Iterator[None]:
        keep = attention_mask.bool().cpu()

        def store_block(module: nn.Module, args: Any, output: Any) -> None:
            hidden = output if isinstance(output, torch.Tensor) else output[0]
            if hidden.shape[:2] != keep.shape:
                self._disable(f"block {self.k - 1}'s output does not line up with the input tokens")
                return
            self._block_tuple_len = None if isinstance(output, torch.Tensor) else len(output)
            hidden = hidden.detach().cpu()
            for i, row, mask in zip(idx, hidden, keep, strict=True):
                if not self._holds(i):  # a custom step may run the model twice per micro-batch
                    self._store(i, row[mask])

        def note_embedding(name: str):
            def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
                self._embedding_out[name] = (output.shape[-1], output.dtype)

            return hook

        handles = [self.blocks[self.k - 1].register_forward_hook(store_block)]
        handles += [m.register_forward_hook(note_embedding(n)) for n, m in self.embeddings]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def _serving(self, idx: Sequence[int], attention_mask: torch.Tensor) -> Iterator[None]:
        keep = attention_mask.bool().cpu()
        first = self._entry(idx[0])
        padded = first.new_zeros(*keep.shape, first.shape[-1])
        padded[keep] = torch.cat([self._entry(i) for i in idx])
        padded = padded.to(attention_mask.device)
        swaps: list[tuple[nn.Module, str, nn.Module]] = []
        for name, _ in self.embeddings:
            dim, dtype = self._embedding_out.get(name, (padded.shape[-1], padded.dtype))
            parent, child = _parent(self.model, name)
            swaps.append((parent, child, _Zeros((*keep.shape, dim), dtype, padded.device)))
        stand_in = _Cached(padded, self._block_tuple_len)
        swaps += [(self.blocks, str(i), stand_in) for i in range(self.k)]
        originals = [getattr(parent, child) for parent, child, _ in swaps]
        try:
            for parent, child, new in swaps:
                setattr(parent, child, new)
            yield
        finally:
            for (parent, child, _), old in zip(swaps, originals, strict=True):
                setattr(parent, child, old)

    # -- the store: RAM up to the bound, then the spill file --------------------------------------------
    def _holds(self, i: int) -> bool:
        return i in self.states or (self.spill is not None and i in self.spill)

    def _entry(self, i: int) -> torch.Tensor:
        state = self.states.get(i)
        return state if state is not None else self.spill.get(i)  # type: ignore[union-attr]

    def _store(self, i: int, row: torch.Tensor) -> None:
        size = row.numel() * row.element_size()
        if self.ram_bound is None or self.ram_used + size <= self.ram_bound:
            self.states[i] = row.clone()
            self.ram_used += size
        else:
            self.spill.append(i, row)  # type: ignore[union-attr]

    def close(self) -> None:
        """End of training: delete the spill file. Entries in it can no longer be served."""
        if self.spill is not None:
            self._spilled = (len(self.spill.index), self.spill.tokens, self.spill.nbytes)
            self.spill.close()

    def _disable(self, why: str) -> None:
        self.k, self.reason = 0, why
        self.states.clear()
        self.ram_used = 0
        self.close()
        print(f"leantune: train.cache_frozen_prefix switched off: {why}", file=sys.stderr)

    # -- numbers for summary.json -------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held in RAM, counted from the tensors themselves."""
        return sum(t.numel() * t.element_size() for t in self.states.values())

    def _spill_counts(self) -> tuple[int, int, int]:
        """(examples, tokens, bytes) in the spill file, also after `close` deleted it."""
        if self.spill is not None and self.spill.index:
            return len(self.spill.index), self.spill.tokens, self.spill.nbytes
        return self._spilled

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"frozen_blocks": self.k}
        if not self.k:
            return {**out, "active": False, "reason": self.reason}
        spilled, spilled_tokens, spilled_bytes = self._spill_counts()
        ram = self.nbytes
        return {
            **out,
            "active": True,
            "cached_examples": len(self.states) + spilled,
            "cached_tokens": sum(len(t) for t in self.states.values()) + spilled_tokens,
            "bytes": ram + spilled_bytes,
            "ram_bound_bytes": self.ram_bound,
            "ram_bytes": ram,
            "ram_examples": len(self.states),
            "spilled_bytes": spilled_bytes,
            "spilled_examples": spilled,
            "micro_batches_from_cache": self.hits,
            "micro_batches_computed": self.misses,
            "tokens_from_cache": self.tokens_from_cache,
        }
