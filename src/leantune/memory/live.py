"""Tensor-byte accounting: the peak of bytes held by tensors allocated inside a block (the memory tests
measure steps with it, and the memory model traces the peak of a no-grad forward pass with it).

A `TorchDispatchMode` sees every aten op (forward, backward, optimizer kernels, random generation) and
counts each newly allocated storage from the op that made it until its tensor is freed. Weights and
buffers that existed before the block are not counted; views and in-place results are not new storage.
Deterministic, unlike the process's RSS, so a test can compare two steps by a clear margin.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and t.layout == torch.strided
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                continue
            storage = t.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or ptr in inputs or ptr in self._tracked:
                continue
            self._tracked.add(ptr)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, ptr, size)
        return out

    def _free(self, ptr: int, size: int) -> None:
        self._tracked.discard(ptr)
        self.live -= size
