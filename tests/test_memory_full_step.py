"""The memory model knows mezo, lomo and adalomo (their `plan_for` hooks and memory/full_step.py): the
predicted peak of one step (weights excluded) is within 15% of the bytes measured with LiveBytes over
real steps of each method's own code, on tiny models; and MeZO's step is far below AdamW's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from leantune.memory.contribution import MemoryContribution
from leantune.memory.estimate import probe_batch
from leantune.memory.full_step import step_estimate
from leantune.methods import get_method
from leantune.methods.lomo import AdaLomoConfig, AdaLomoRuntime, LomoConfig, LomoRuntime
from leantune.methods.mezo import MezoConfig, MezoRuntime
from leantune.models.loader import load_model
from tests.live_bytes import LiveBytes

TOLERANCE = 0.15
BATCH, SEQ = 8, 32


class _Acc:
    def backward(self, loss, **kwargs) -> None:
        loss.backward(**kwargs)


def _trainer(model):
    opt = torch.optim.SGD([{"params": list(model.parameters()), "weight_decay": 0.0}], lr=1e-6)
    cfg = SimpleNamespace(train=SimpleNamespace(max_grad_norm=1.0))
    return SimpleNamespace(torch_optimizer=opt, state=SimpleNamespace(step=0), module=model, cfg=cfg)


def _own_step(runtime):
    def step(model, batch, trainer) -> None:
        if trainer.state.step == 0:
            runtime.on_train_start(trainer)
        runtime.on_step_start(trainer)
        runtime.step(model, batch, _Acc(), 1.0)
        runtime.on_step_end(trainer)
        trainer.state.step += 1

    return step


def _adamw_step():
    box: dict = {}

    def step(model, batch, trainer) -> None:
        model.train()
        opt = box.setdefault("opt", torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=False))
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


STEPS = {
    "adamw": (None, _adamw_step),
    "mezo": (MezoConfig(), lambda: _own_step(MezoRuntime(MezoConfig(), seed=0))),
    "lomo": (LomoConfig(), lambda: _own_step(LomoRuntime(LomoConfig()))),
    "adalomo": (AdaLomoConfig(), lambda: _own_step(AdaLomoRuntime(AdaLomoConfig()))),
}


def measured_and_predicted(path, task: str, method: str) -> tuple[int, int]:
    torch.manual_seed(0)
    model = load_model(str(path), task, "float32", ["neg", "pos"])
    model.config.use_cache = False
    cfg, make = STEPS[method]
    contribution = get_method(method).plan_for(model, cfg) if cfg is not None else MemoryContribution()
    predicted = step_estimate(model, task, BATCH, SEQ, contribution)["step"]
    batch = probe_batch(model, task, BATCH, SEQ)
    step, trainer = make(), _trainer(model)
    model.train()
    with LiveBytes() as live:  # two steps: state made in the first (AdamW, AdaLomo) is held in the second
        step(model, batch, trainer)
        step(model, batch, trainer)
    return live.peak, predicted


@pytest.mark.parametrize("method", ["mezo", "lomo", "adalomo"])
@pytest.mark.parametrize(("arch", "task"), [("llama", "causal_lm"), ("bert", "classification")])
def test_predicted_step_peak_is_within_15_percent(tiny_models, arch, task, method):
    """Measured on 2026-12-04 (predicted / measured): llama mezo 1.07, lomo 1.00, adalomo 1.08; bert
    mezo 1.13, lomo 0.96, adalomo 1.11. (AdamW's backprop model, fitted to RSS on MiniLM, reads 1.40
    and 1.25 against LiveBytes on these tiny models: it is not what this test checks.)"""
    measured, predicted = measured_and_predicted(tiny_models[arch], task, method)
    assert abs(predicted - measured) <= TOLERANCE * measured, (measured, predicted)


def test_mezo_is_predicted_and_measured_far_below_adamw(tiny_models):
    """The planner's reason to propose MeZO: on the tiny Llama its step is under half of AdamW's, both
    measured and predicted."""
    mezo_measured, mezo_predicted = measured_and_predicted(tiny_models["llama"], "causal_lm", "mezo")
    adamw_measured, adamw_predicted = measured_and_predicted(tiny_models["llama"], "causal_lm", "adamw")
    assert mezo_measured < 0.5 * adamw_measured and mezo_predicted < 0.5 * adamw_predicted


def test_plan_proposes_a_frugal_full_tuning_method_when_adamw_does_not_fit(base_overrides, capsys):
    """Tiny BERT, batch 16: AdamW full tuning needs ~23 MiB, AdaLomo ~16, LOMO ~8, MeZO ~6: each budget
    gets the first that fits, in the order of quality per step (adalomo, lomo, mezo)."""
    from leantune.cli import main

    def line(budget: str) -> str:
        assert main(["plan", *base_overrides, "--memory-budget", budget]) == 0
        return next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("full fine-tuning"))

    assert "AdamW needs" in line("7MiB") and "methods: [mezo]" in line("7MiB")
    assert "methods: [lomo]" in line("12MiB")
    assert "methods: [adalomo]" in line("20MiB")
    assert "full fine-tuning: AdamW fits" in line("64MiB")
