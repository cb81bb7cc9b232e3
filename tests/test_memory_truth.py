"""Memory truth (issue 19, item 5): every run reports its step peak beside its process peak, and
dynamic_rank's budget controller reads the step peak the right way per device. CUDA is simulated by
mocking torch.cuda's counters (no GPU here); benchmarks/gpu/memory_truth_check.py is the real-GPU check."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from leantune.config import load_config
from leantune.memory.measure import StepPeakMeter
from leantune.methods.dynamic_rank import DynamicRankConfig, DynamicRankRuntime
from leantune.methods.registry import MethodContext
from leantune.recipes.train import run_train


def test_cpu_summary_reports_step_and_process_peaks(base_overrides):
    summary = run_train(load_config(None, [*base_overrides, "train.max_steps=3"]))
    mem = summary["memory"]
    assert mem["step_peak_source"] == "rss"
    # a step's peak RSS is part of the process's life: below its lifetime peak, above what it grew by
    assert 50 * 2**20 < mem["step_peak_bytes"] <= mem["peak_rss_bytes"]
    assert 0 < mem["step_peak_growth_bytes"] < mem["step_peak_bytes"]
    assert "cuda_max_allocated_bytes" not in mem


class FakeCuda:
    """torch.cuda's peak counters, scripted: `allocated` now, and the peak each step will report."""

    def __init__(self, monkeypatch, allocated: int) -> None:
        self.allocated, self.peak, self.resets = allocated, allocated, 0
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: self.allocated)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", self._reset)

    def _reset(self, device=None) -> None:
        self.resets += 1
        self.peak = self.allocated

    def step(self, meter: StepPeakMeter, peak: int) -> None:
        meter.start()
        self.peak = peak  # what the step allocated at most
        meter.stop()


def test_the_meter_takes_cuda_max_allocated_per_step_and_keeps_the_lifetime_peak(monkeypatch):
    cuda = FakeCuda(monkeypatch, allocated=500)
    meter = StepPeakMeter("cuda")
    assert meter.cuda and meter.source == "cuda_max_allocated"
    cuda.step(meter, 9000)
    cuda.step(meter, 7000)
    assert cuda.resets == 2 and meter.last == 7000 and meter.last_growth == 6500 and meter.largest == 9000
    assert meter.cuda_lifetime_peak() == 9000  # the reset before step 2 did not lose step 1's peak
    assert StepPeakMeter("cpu").source == "rss"  # a CPU model beside a GPU is still measured by RSS


def _controller(budget: int) -> DynamicRankRuntime:
    cfg = DynamicRankConfig(budget=budget, realloc_every=2, drift_threshold=1.0, memory_margin=0.05)
    rt = DynamicRankRuntime(None, cfg, MethodContext(task="classification", seed=0))
    rt.plan = {"estimate": {"weights": 1000, "optimizer_state": 2000, "total": 800_000}}
    rt.importance = {"layer": 1.0}
    return rt


def test_the_budget_controller_replans_on_the_cuda_figure(monkeypatch):
    """On CUDA the measured peak is max_memory_allocated itself; the CPU formula (weights + AdamW state
    + growth within the step) would read 3,000 + 490,000 here and see no reason to re-plan."""
    cuda = FakeCuda(monkeypatch, allocated=500_000)
    rt = _controller(budget=1_000_000)
    planned, applied, logged = [], [], []
    monkeypatch.setattr(rt, "_probe", lambda trainer, offset: ({"layer": 1.0}, 0.5))
    monkeypatch.setattr(rt, "_plan", lambda trainer, importance, budget: planned.append(budget) or "plan")
    monkeypatch.setattr(rt, "_apply_plan", lambda trainer, plan, reason: applied.append(reason))
    trainer = SimpleNamespace(
        step_meter=StepPeakMeter("cuda"),
        state=SimpleNamespace(step=0),
        total_steps=10,
        log=SimpleNamespace(log=logged.append),
    )
    cuda.step(trainer.step_meter, 990_000)  # step 1: above 0.95 x budget
    rt.on_step_end(trainer)
    assert rt.measured_peak == 990_000 and rt.measure_source == "cuda_max_allocated" and not planned
    trainer.state.step = 1
    cuda.step(trainer.step_meter, 600_000)  # step 2: the check sees the largest peak since the last one
    rt.on_step_end(trainer)
    assert logged[-1]["measured_peak_bytes"] == 990_000
    assert planned == [int(1_000_000 * 800_000 / 990_000)]  # budget scaled by estimate / measured
    assert "measured peak" in applied[0]
    rt.model = torch.nn.Linear(2, 2)  # report() counts its trainable parameters
    assert rt.report()["measured_peak_source"] == "cuda_max_allocated"


def test_the_cpu_controller_figure_is_the_persistent_part_plus_the_growth(monkeypatch):
    rt = _controller(budget=1_000_000)
    meter = SimpleNamespace(source="rss", last=123_456_789, last_growth=40_000)
    assert rt.measured_step_peak(meter) == 1000 + 2000 + 40_000
    assert rt.measured_step_peak(SimpleNamespace(source=None, last=None, last_growth=None)) is None


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_without_a_reset_there_is_no_step_peak(monkeypatch, device):
    if device == "cuda":
        FakeCuda(monkeypatch, allocated=1)
    else:
        import leantune.memory.budget as budget

        monkeypatch.setattr(budget, "reset_peak_rss", lambda: False)
    meter = StepPeakMeter(device)
    meter.start()
    got = meter.stop()
    assert (got is None) == (device == "cpu")
    assert (meter.report()["step_peak_bytes"] is None) == (device == "cpu")
