"""The memory model and the rank planner: exact parameter/gradient/optimizer bytes, traced activations
that scale as claimed, plans that respect the budget, and one-line errors naming the minimum budget.

Peak RSS of a whole step is compared with the model in benchmarks/results/memory-model/ (a grid on the
real MiniLM, one process per setting): on tiny models the activations are kilobytes, below RSS noise.
"""

from __future__ import annotations

import sys

import pytest
import torch

from leantune.errors import UserError
from leantune.memory.budget import parse_budget
from leantune.memory.estimate import estimate_memory, probe_batch, trace_activations
from leantune.memory.planner import RankCost, plan_ranks
from leantune.methods import MethodContext, apply_methods
from leantune.methods.registry import method_config_class
from leantune.models.loader import load_model
from leantune.train.optim import build_optimizer
from tests.conftest import cli_err


def _model(path, task: str, methods: list[dict]):
    torch.manual_seed(0)
    model = load_model(str(path), task, "float32", ["neg", "pos"] if task == "classification" else None)
    configs = [method_config_class(m["name"])(**m) for m in methods]
    return apply_methods(model, configs, MethodContext(task=task, seed=0))


@pytest.mark.parametrize(
    ("arch", "task", "methods"),
    [
        ("bert", "classification", [{"name": "lora", "r": 4}]),
        ("gpt2", "causal_lm", [{"name": "freeze", "layers": 1}]),
    ],
)
def test_parameter_gradient_and_optimizer_bytes_are_exact(tiny_models, arch, task, methods):
    torch.set_num_threads(1)
    model = _model(tiny_models[arch], task, methods)
    est = estimate_memory(model, task, batch_size=4, seq_len=12)
    assert est.weight_bytes == sum(p.numel() * p.element_size() for p in model.parameters())
    opt = build_optimizer(model, 1e-3, 0.0)
    model.train()
    model(**probe_batch(model, task, 4, 12)).loss.backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    assert est.grad_bytes == grads
    assert est.optimizer_bytes == state


@pytest.mark.parametrize(("arch", "task"), [("bert", "classification"), ("llama", "causal_lm")])
def test_traced_activations_scale_with_batch_and_follow_the_trained_layers(tiny_models, arch, task):
    torch.set_num_threads(1)
    lora = _model(tiny_models[arch], task, [{"name": "lora", "r": 4, "target_modules": "all-linear"}])
    est = estimate_memory(lora, task, batch_size=6, seq_len=16)
    measured = trace_activations(lora, task, 16, batch_size=6).total  # saved tensors at the real batch
    assert est.activation_bytes == pytest.approx(measured, rel=0.10)
    # Freezing the lower two blocks: backward stops above them, so they save nothing at all.
    frozen = _model(tiny_models[arch], task, [{"name": "freeze", "layers": 2}])
    full = _model(tiny_models[arch], task, [{"name": "full"}])
    rows_frozen = {r.name: r.activation_bytes for r in estimate_memory(frozen, task, 6, 16).layers}
    rows_full = {r.name: r.activation_bytes for r in estimate_memory(full, task, 6, 16).layers}
    lower = [name for name in rows_full if name.endswith((".0", ".1"))]
    assert len(lower) == 2 and all(rows_full[n] > 0 and rows_frozen.get(n, 0) == 0 for n in lower)
    top = next(name for name in rows_full if name.endswith(".2"))
    assert rows_frozen[top] > 0


def test_tracing_leaves_no_tensors_behind(tiny_models):
    """The planner traces once per candidate set; a trace that kept its graph leaked ~90 MB a plan."""
    import gc

    model = _model(tiny_models["bert"], "classification", [{"name": "dynamic_rank", "budget": "1GiB"}])

    def live() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    trace_activations(model, "classification", 16)  # first call: lazily created buffers, if any
    before = live()
    for _ in range(3):
        assert trace_activations(model, "classification", 16).total > 0
    assert live() - before <= 2


def test_recompute_saves_activation_memory(tiny_models):
    model = _model(tiny_models["bert"], "classification", [{"name": "full"}])
    plain = estimate_memory(model, "classification", 8, 32)
    ckpt = estimate_memory(model, "classification", 8, 32, recompute=True)
    assert ckpt.activation_bytes < plain.activation_bytes
    assert ckpt.grad_bytes == plain.grad_bytes


def _cost(tiny_models) -> tuple[RankCost, dict[str, float]]:
    model = _model(tiny_models["bert"], "classification", [{"name": "dynamic_rank", "budget": "1GiB"}])
    cost = RankCost(model, "classification", 16)
    names = sorted(cost.layers)
    importance = {n: (i + 1) / sum(range(1, len(names) + 1)) for i, n in enumerate(names)}
    return cost, importance


def test_planner_respects_the_budget_and_ranks_shrink_with_it(tiny_models):
    torch.set_num_threads(1)
    cost, importance = _cost(tiny_models)
    smallest = {n: 0 for n in importance} | {max(importance, key=importance.get): 1}
    floor = cost.total(smallest, 16, False)
    largest = cost.total(dict.fromkeys(importance, 16), 16, False)
    budgets = [int(floor + f * (largest - floor)) for f in (1.0, 0.6, 0.3, 0.1, 0.0)]
    totals = []
    for budget in budgets:
        plan = plan_ranks(cost, importance, 1.0, budget, 16, max_rank=16, min_share=0.0)
        assert plan.estimate["total"] <= budget
        assert plan.estimate["total"] == cost.total(plan.ranks, 16, False)
        totals.append(sum(plan.ranks.values()))
    assert totals == sorted(totals, reverse=True) and totals[0] > totals[-1] == 1
    first = plan_ranks(cost, importance, 1.0, budgets[0], 16, max_rank=16, min_share=0.0)
    top = max(importance, key=importance.get)
    assert first.ranks[top] == 16 and all(layer.reason for layer in first.layers)


def test_uniform_allocation_gives_every_layer_the_cap_when_the_budget_allows(tiny_models):
    cost, importance = _cost(tiny_models)
    roomy = cost.total(dict.fromkeys(importance, 8), 16, False)
    plan = plan_ranks(cost, importance, 1.0, roomy, 16, max_rank=8, uniform=True)
    assert set(plan.ranks.values()) == {8}  # importance-proportional targets would differ per layer
    assert len(set(plan_ranks(cost, importance, 1.0, roomy, 16, max_rank=8).ranks.values())) > 1
    tight = plan_ranks(
        cost,
        importance,
        1.0,
        (roomy + cost.total(dict.fromkeys(importance, 4), 16, False)) // 2,
        16,
        max_rank=8,
        uniform=True,
    )
    top = max(importance, key=importance.get)
    assert set(tight.ranks.values()) <= {4, 8} and tight.ranks[top] == 8  # the important layers first


def test_planner_may_plan_on_a_4bit_base_and_counts_it_like_the_quant_method(tiny_models):
    cost, importance = _cost(tiny_models)
    top = max(importance, key=importance.get)
    minimal = {n: 0 for n in importance} | {top: 1}
    quantized = cost.quantized_base()
    budget = (cost.total(minimal, 16, False) + quantized.total(minimal, 16, False)) // 2
    with pytest.raises(UserError, match="a 4-bit base"):  # the error names the lever that would help
        plan_ranks(cost, importance, 1.0, budget, 16)
    plan = plan_ranks(cost, importance, 1.0, budget, 16, allow_quantize=True)
    assert plan.quantize and any("4-bit NF4 base" in c for c in plan.changes)
    assert plan.estimate["total"] <= budget
    # the planned weights match a model the quant method really quantised (packed codes + scales)
    real = _model(
        tiny_models["bert"],
        "classification",
        [{"name": "quant", "bits": 4, "backend": "torch"}, {"name": "dynamic_rank", "budget": "1GiB"}],
    )
    real_cost = RankCost(real, "classification", 16)
    assert real_cost.quantizable_bytes == 0  # nothing left to quantise
    planned = quantized.breakdown(minimal, 16, False)["weights"]
    stored = sum(t.numel() * t.element_size() for t in [*real.parameters(), *real.buffers()])
    assert planned == pytest.approx(stored, rel=0.05)
    saved = cost.breakdown(minimal, 16, False)["weights"] - planned  # fp32 -> ~4.1 bits a weight
    assert saved == pytest.approx(cost.quantizable_bytes * (1 - 0.5158 / 4), rel=0.01) and saved > 0


@pytest.mark.parametrize("margin", [0.0, 0.1])
def test_impossible_budget_names_the_minimum_that_fits(tiny_models, margin):
    cost, importance = _cost(tiny_models)
    with pytest.raises(UserError, match=r"at least") as err:
        plan_ranks(cost, importance, 1.0, 1000, 16, safety_margin=margin)
    need = int(str(err.value).split("(")[2].split(" bytes")[0])
    plan = plan_ranks(cost, importance, 1.0, need, 16, safety_margin=margin)  # the named minimum fits
    assert sum(plan.ranks.values()) == 1
    assert plan.estimate["total"] <= (1 - margin) * need  # the margin is kept free
    with pytest.raises(UserError):
        plan_ranks(cost, importance, 1.0, need - 1, 16, safety_margin=margin)
    shrunk = plan_ranks(cost, importance, 1.0, need, 64, allow_batch_reduce=True, safety_margin=margin)
    assert shrunk.batch_size < 64 and any("batch size" in c for c in shrunk.changes)


def test_budget_parsing(monkeypatch):
    import leantune.memory.budget as budget

    assert parse_budget("2GiB") == 2 * 2**30
    assert parse_budget("512 MB") == 512 * 10**6
    assert parse_budget(3e9) == 3_000_000_000
    monkeypatch.setattr(budget, "available_bytes", lambda: 10_000)
    assert parse_budget("0.5") == 5_000
    assert parse_budget(0.25, lambda: 8_000) == 2_000  # a fraction of what the caller names (host RAM)
    assert parse_budget("1KiB", lambda: 8_000) == 1024
    with pytest.raises(UserError, match="not a memory size"):
        parse_budget("2 apples")


def test_plan_cli_prints_the_plan_and_rejects_an_impossible_budget(base_overrides, capsys, tmp_path):
    from leantune.cli import main

    out = tmp_path / "plan.json"
    assert main(["plan", *base_overrides, "--memory-budget", "64MiB", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "importance" in printed and "attention.self.value" in printed
    assert out.is_file() and not (tmp_path / "run").exists()  # nothing of a run is written
    line = cli_err(capsys, "plan", *base_overrides, "--memory-budget", "100KB")
    assert "too small" in line and "at least" in line
    assert "memory size" in cli_err(capsys, "plan", *base_overrides, "--memory-budget", "lots")


_HOLES = """
import gc, sys, torch
from leantune.memory.budget import current_rss, return_freed_memory
applied = return_freed_memory() if sys.argv[1] == "mmap" else False
y = torch.empty(8 * 1024 * 1024).fill_(1)
del y  # a freed 32 MiB mapping raises glibc's dynamic threshold: 256 KiB pieces then go to the heap
keep, big = [], []
start = current_rss()
for _ in range(400):
    big.append(torch.ones(64 * 1024))  # 256 KiB
    keep.append(torch.ones(16))  # small and long-lived, between the big ones: the heap cannot shrink
grown = current_rss() - start
del big
gc.collect()
print(applied, grown, current_rss() - start)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_return_freed_memory_makes_rss_follow_live_tensors():
    """The setting dynamic_rank's budget relies on: freed tensors leave RSS instead of staying cached."""
    import subprocess

    def held(mode: str) -> tuple[bool, int, int]:
        out = subprocess.run(
            [sys.executable, "-c", _HOLES, mode], capture_output=True, text=True, check=True
        ).stdout.split()
        return out[0] == "True", int(out[1]), int(out[2])

    _, grown, default_held = held("default")
    applied, mmap_grown, mmap_held = held("mmap")
    if not applied:
        pytest.skip("no glibc mallopt here")
    assert grown > 80 * 2**20 and mmap_grown > 80 * 2**20  # both really held ~100 MiB at once
    assert default_held > 0.8 * grown  # glibc's default keeps the freed holes resident
    assert mmap_held < 0.1 * mmap_grown  # with the setting they go back to the OS


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/clear_refs")
def test_lifetime_peak_survives_the_per_step_resets():
    """dynamic_rank resets the kernel's peak to measure each step; the run's reported peak must not
    forget what came before (it read only the last step's window, well below the real peak)."""
    import subprocess

    code = """
import torch
from leantune.memory.budget import current_rss, reset_peak_rss
from leantune.memory.measure import peak_rss_bytes
x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
high = current_rss()
del x
if not reset_peak_rss():
    raise SystemExit(3)
print(high, peak_rss_bytes(), current_rss())
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if run.returncode == 3:
        pytest.skip("clear_refs is not writable here")
    high, peak, now = map(int, run.stdout.split())
    assert high > now + 32 * 2**20  # the 64 MiB were given back...
    assert peak >= high - 4 * 2**20  # ...and the peak remembers them (VmHWM lags VmRSS by a few pages)
