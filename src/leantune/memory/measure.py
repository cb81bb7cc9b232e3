"""Peak memory as the papers report it: process RSS on CPU, max allocated on CUDA; per step and per run.

Two figures, because they answer different questions. The process peak (lifetime peak RSS on CPU,
lifetime `torch.cuda.max_memory_allocated` on CUDA) is what the machine had to hold, runtime, dataset and
evaluation included. The step peak is the largest peak within one optimisation step, measured fresh
each step (`StepPeakMeter`): on CUDA `max_memory_allocated` after `reset_peak_memory_stats` at the step
start (every tensor the step holds: weights, gradients, optimizer state, activations; neither the CUDA
context nor the allocator's cached blocks); on CPU the peak RSS (VmHWM) after resetting it at the step
start, and its growth over the RSS at the step start. A memory budget bounds the step peak (see
docs/memory.md): that is what the memory model estimates and what `dynamic_rank` controls.
"""

from __future__ import annotations

import resource
import sys
from typing import Any


def peak_rss_bytes() -> int:
    """Lifetime peak resident set size of this process (Linux reports KiB, macOS bytes), including the
    peaks before any reset of the kernel's counter (the step meter resets it to measure single steps)."""
    from leantune.memory.budget import peak_before_resets

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(int(peak if sys.platform == "darwin" else peak * 1024), peak_before_resets())


class StepPeakMeter:
    """Measures each optimisation step's peak memory; the trainer starts and stops it around every step.

    Why one meter owned by the trainer: both the kernel's peak RSS and CUDA's peak counter are global
    to the process, so two parties resetting them (the trainer for summary.json, dynamic_rank for its
    budget) would read each other's windows. Methods read `last` / `last_growth` in `on_step_end`.
    `source` names the figure: "cuda_max_allocated" where the model runs on CUDA, else "rss" (None where
    the platform cannot reset its peak RSS: then no step peak is known)."""

    def __init__(self, device: Any = "cpu") -> None:
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.source: str | None = "cuda_max_allocated" if self.cuda else "rss"
        self.last: int | None = None  # the last step's peak (absolute)
        self.last_growth: int | None = None  # ... minus what was held when the step started
        self.largest = 0  # the largest step peak so far
        self.largest_growth = 0
        self._base: int | None = None
        self._cuda_before_resets = 0  # lifetime max_memory_allocated, kept across the per-step resets

    def start(self) -> None:
        import torch

        if self.cuda:
            self._cuda_before_resets = max(
                self._cuda_before_resets, int(torch.cuda.max_memory_allocated(self.device))
            )
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = int(torch.cuda.memory_allocated(self.device))
            return
        from leantune.memory.budget import current_rss, reset_peak_rss

        self._base = current_rss() if reset_peak_rss() else None
        if self._base is None:
            self.source = None

    def stop(self) -> int | None:
        """The step's peak (bytes); also kept in `last`, `last_growth`, `largest`."""
        import torch

        if self._base is None:
            return None
        if self.cuda:
            peak: int | None = int(torch.cuda.max_memory_allocated(self.device))
        else:
            from leantune.memory.budget import peak_rss_since_reset

            peak = peak_rss_since_reset()
        if peak is None:
            return None
        self.last, self.last_growth = peak, max(0, peak - self._base)
        self.largest = max(self.largest, peak)
        self.largest_growth = max(self.largest_growth, self.last_growth)
        return peak

    def cuda_lifetime_peak(self) -> int:
        import torch

        return max(self._cuda_before_resets, int(torch.cuda.max_memory_allocated(self.device)))

    def report(self) -> dict[str, Any]:
        return {
            "step_peak_bytes": self.largest if self.last is not None else None,
            "step_peak_growth_bytes": self.largest_growth if self.last is not None else None,
            "step_peak_source": self.source if self.last is not None else None,
        }


def peak_memory(meter: StepPeakMeter | None = None) -> dict[str, Any]:
    """Process peaks, plus the step peaks of `meter` (the trainer's) where there is one."""
    import torch

    out: dict[str, Any] = {"peak_rss_bytes": peak_rss_bytes()}
    if torch.cuda.is_available():
        lifetime = meter.cuda_lifetime_peak() if meter is not None and meter.cuda else None
        out["cuda_max_allocated_bytes"] = lifetime or int(torch.cuda.max_memory_allocated())
    if meter is not None:
        out |= meter.report()
        out["peak_phase"] = peak_phase(out)
    return out


def peak_phase(peaks: dict[str, Any]) -> str | None:
    """Which phase set the process's peak: `train_step` where the largest step peak reaches it, else
    `outside_steps` (the evaluation pass, loading or saving: a causal LM's evaluation of many rows holds
    its logits whole and often outweighs a LoRA step; `leantune plan` predicts which). None where no step
    peak was measured."""
    step = peaks.get("step_peak_bytes")
    if step is None:
        return None
    process = (
        peaks.get("cuda_max_allocated_bytes")
        if peaks.get("step_peak_source") == "cuda_max_allocated"
        else None
    )
    process = process if process is not None else peaks["peak_rss_bytes"]
    return "train_step" if step >= process else "outside_steps"
