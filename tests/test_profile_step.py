"""benchmarks/profile_step.py's accounting: each profiler event's own time lands in one category (a
trainer phase around it wins over op names, else the innermost op name that matches), and the wall time
no event covers is Python between ops, so the shares add up to the profiled time."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ps():
    spec = importlib.util.spec_from_file_location("profile_step", ROOT / "benchmarks" / "profile_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Device(Enum):
    CPU = 0


@dataclass
class Event:
    """The fields of torch.autograd.profiler_util.FunctionEvent that the accounting reads."""

    name: str
    self_us: float
    parent: Event | None = None
    thread: int = 1
    device_type: _Device = _Device.CPU

    @property
    def cpu_parent(self):
        return self.parent

    @property
    def self_cpu_time_total(self) -> float:
        return self.self_us

    @property
    def cpu_time_total(self) -> float:
        return self.self_us + sum(e.self_us for e in EVENTS if e.parent is self)


EVENTS: list[Event] = []


def test_phases_win_over_op_names_and_the_innermost_op_decides(ps):
    opt = Event("Optimizer.step#AdamW.step", 10)
    assert ps.categorise(Event("aten::mul", 1, opt)) == "optimizer"
    assert ps.categorise(Event("aten::mm", 1, Event("AddmmBackward0", 1))) == "matmul"
    assert ps.categorise(Event("aten::mul", 1, Event("NativeDropoutBackward0", 1))) == "dropout"
    sdpa = Event("aten::_scaled_dot_product_attention_math", 1)
    assert ps.categorise(Event("aten::bmm", 1, sdpa)) == "matmul"
    assert ps.categorise(sdpa) == "attention_sdpa"
    assert ps.categorise(Event("aten::bernoulli_", 1, sdpa)) == "dropout"
    assert ps.categorise(Event("aten::mul", 1, Event("leantune::collate", 1))) == "collation"
    assert ps.categorise(Event("aten::add", 1)) == "other_ops"


def test_shares_add_up_to_the_profiled_wall_time(ps):
    class Prof:
        def events(self):
            return EVENTS

    linear = Event("aten::linear", 0)
    EVENTS[:] = [
        Event("leantune::collate", 1000),
        linear,
        Event("aten::mm", 3000, linear),
        Event("aten::gelu", 2000),
        Event("aten::add", 500),
    ]
    out = ps.breakdown(Prof(), wall_s=0.010, steps=2)  # 10 ms profiled, 6.5 ms covered by events
    assert out["ms_per_step"]["collation"] == pytest.approx(0.5)
    assert out["ms_per_step"]["matmul"] == pytest.approx(1.5)
    assert out["ms_per_step"]["python_between_ops"] == pytest.approx(1.75)
    assert sum(out["share"].values()) == pytest.approx(1.0)
    assert out["share_trainer_own"] == pytest.approx(0.1)
    assert set(ps.CATEGORIES) <= set(out["share"])  # every category present, zeros included
