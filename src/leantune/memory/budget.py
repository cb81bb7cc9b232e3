"""Memory budgets as users write them ("2GiB", "512MB", 3e9, or 0.5 of what is available) and the
process's own peak memory as Linux reports it (resettable, so a step's peak can be read alone)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

from leantune.errors import UserError

UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}
UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tb": 10**12, "tib": 2**40}
_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.I)
#: no machine has a petabyte of memory: a larger budget is a typo (an extra zero, 1e400)
MAX_BUDGET_BYTES = 2**50
_SYNTAX = "write e.g. 2GiB, 512MiB, 3e9 or a fraction such as 0.5"


def check_budget(value: str | float | int) -> str | float | int:
    """Validate the syntax and range only (cheap, in the config validator); bytes are resolved later."""
    if isinstance(value, bool):
        raise ValueError(f"{str(value).lower()} is not a memory size; {_SYNTAX}")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        m = _BUDGET.match(str(value))
        if not m or m.group(2).lower() not in UNITS:
            raise ValueError(f"'{value}' is not a memory size; {_SYNTAX}")
        number = float(m.group(1)) * UNITS[m.group(2).lower()]
    if not math.isfinite(number):
        raise ValueError(f"'{value}' is not a finite memory size; {_SYNTAX}")
    if number <= 0:
        raise ValueError(
            f"must be positive: bytes (e.g. 2GiB) or a fraction of available memory (0.5), not {value}"
        )
    if number > MAX_BUDGET_BYTES:
        raise ValueError(f"'{value}' is more than a petabyte, surely a typo; {_SYNTAX}")
    return value


def available_bytes() -> int:
    """Memory the run could still use: free CUDA memory on a GPU, else the OS's available memory."""
    import torch

    if torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info()
        return int(free)
    return host_available_bytes()


def host_available_bytes() -> int:
    """Host RAM the OS could still give us (for what lives in RAM whatever the device, like a cache)."""
    import psutil

    return int(psutil.virtual_memory().available)


def parse_budget(value: str | float | int, available: Callable[[], int] | None = None) -> int:
    """Bytes for a budget; a number <= 1 is a fraction of `available()` now (default: available_bytes,
    the device's; looked up at call time)."""
    try:
        check_budget(value)
    except ValueError as exc:
        raise UserError(f"memory budget: {exc}") from None
    if isinstance(value, (int, float)) or not _BUDGET.match(str(value)).group(2):
        number = float(value)
        return int(number * (available or available_bytes)()) if number <= 1 else int(number)
    m = _BUDGET.match(str(value))
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def _status_bytes(key: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


def current_rss() -> int | None:
    return _status_bytes("VmRSS")


def library_rss() -> int | None:
    """Resident bytes of the shared libraries' mapped files (libtorch's kernels, MKL, ...).

    Why: a kernel's machine code is paged in the first time it runs (libtorch_cpu alone grows by ~20 MiB
    over a model's first training step on CPU). That is RSS, but not memory the model or its training
    holds, and it does not grow with the model; a measured per-rank peak takes it out. None where
    /proc/self/smaps is missing."""
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return None
    total, library = 0, False
    for line in text.splitlines():
        head = line.split(maxsplit=6)
        if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's first line
            library = len(head) == 6 and (head[5].endswith(".so") or ".so." in head[5])
        elif library and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def peak_rss_since_reset() -> int | None:
    return _status_bytes("VmHWM")


_PEAK_BEFORE_RESETS = 0  # the largest VmHWM seen just before a reset


def reset_peak_rss() -> bool:
    """Linux resets the process's peak RSS on `5` written to clear_refs; False where that is missing.

    The kernel's lifetime peak (getrusage's ru_maxrss) is reset with it, so the peak up to now is kept
    here first: `lifetime_peak_rss` still reports the whole run's peak after any number of resets."""
    global _PEAK_BEFORE_RESETS, _WINDOW_PEAK
    _PEAK_BEFORE_RESETS = max(_PEAK_BEFORE_RESETS, peak_rss_since_reset() or 0)
    if _WINDOW_PEAK is not None:
        _WINDOW_PEAK = max(_WINDOW_PEAK, peak_rss_since_reset() or 0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_before_resets() -> int:
    return _PEAK_BEFORE_RESETS


_WINDOW_PEAK: int | None = None  # the largest VmHWM seen before a reset since start_peak_window


def start_peak_window() -> bool:
    """Reset the peak RSS and open a window whose peak `peak_rss_in_window` reports, across any later
    resets: the trainer's step meter (memory/measure.py) resets the counter at every step, which alone
    would hide the peaks of earlier steps and evaluations from a "peak since the model loaded"."""
    global _WINDOW_PEAK
    ok = reset_peak_rss()
    _WINDOW_PEAK = 0 if ok else None
    return ok


def peak_rss_in_window() -> int | None:
    now = peak_rss_since_reset()
    if now is None or _WINDOW_PEAK is None:
        return now
    return max(_WINDOW_PEAK, now)


MMAP_THRESHOLD = 131072  # bytes; the allocator setting the memory model was validated under
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def return_freed_memory() -> bool:
    """Make glibc serve every allocation above 128 KiB from its own mapping, returned to the OS on free.

    Why: under glibc's default, freed activations stay cached in the heap, so the process's RSS is not
    what the step uses. The first full-size pass then grows RSS by about twice the live tensors, and
    later steps by much less (benchmarks/results/memory-model/). With this setting RSS follows live
    tensors, and the memory model is within 8.8% of it, which a budget can be planned against. It
    equals starting Python with MALLOC_MMAP_THRESHOLD_=131072, but only affects allocations made from
    now on. Returns False where there is no glibc (macOS, musl, Windows)."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False
