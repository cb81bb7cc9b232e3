"""Tensor-byte accounting: the peak of bytes held by tensors allocated inside a block (the memory tests
measure steps with it, and the memory model traces the peak of a no-grad forward pass with it).

A `TorchDispatchMode` sees every aten op (forward, backward, optimizer kernels, random generation) and
counts each newly allocated storage from the op that made it until its tensor is freed. Weights and
buffers that existed before the block are not counted; views and in-place results are not new storage.
Deterministic, unlike the process's RSS, so a test can compare two steps by a clear margin.

`views=True` counts a storage until the last tensor on it dies: an op's output tensor often dies at
once while a view of it lives on (a causal LM's `lm_head` matmul output is reshaped to (rows, sequence,
vocabulary) and returned as the logits), and counting per tensor then frees the logits before the loss
takes their log-softmax, halving that peak. Off by default: the fused-backward and forward-only plans
(memory/full_step.py) were checked against RSS with the per-tensor count and have not been rechecked.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self, views: bool = False) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.views = views
        self._tracked: set[int] = set()
        self._refs: dict[int, int] = {}  # views=True: tensors alive on each counted storage

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
            if self.views and ptr in self._refs:  # one more tensor keeps a counted storage alive
                self._refs[ptr] += 1
                weakref.finalize(t, self._free, ptr, size)
                continue
            if size == 0 or ptr in inputs or ptr in self._tracked:
                continue
            self._tracked.add(ptr)
            self._refs[ptr] = 1
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, ptr, size)
        return out

    def _free(self, ptr: int, size: int) -> None:
        self._refs[ptr] = self._refs.get(ptr, 1) - 1
        if self.views and self._refs[ptr] > 0:
            return
        self._refs.pop(ptr, None)
        self._tracked.discard(ptr)
        self.live -= size
