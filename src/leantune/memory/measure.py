"""Peak memory as the papers report it: process RSS on CPU, max allocated on CUDA."""

from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    """Lifetime peak resident set size of this process (Linux reports KiB, macOS bytes), including the
    peaks before any reset of the kernel's counter (dynamic_rank resets it to measure single steps)."""
    from leantune.memory.budget import peak_before_resets

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(int(peak if sys.platform == "darwin" else peak * 1024), peak_before_resets())


def peak_memory() -> dict[str, int]:
    import torch

    out = {"peak_rss_bytes": peak_rss_bytes()}
    if torch.cuda.is_available():
        out["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    return out
