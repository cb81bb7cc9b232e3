"""The method runtime contract: hooks run around every step, a custom step replaces backprop, and a
runtime's state and tensors travel through checkpoints so `--resume` restores them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from leantune.config import load_config
from leantune.methods.registry import (
    MethodConfig,
    MethodRuntime,
    MethodSpec,
    available_methods,
    get_method,
    register,
)
from leantune.recipes.train import run_train
from leantune.train.step import backprop_step


class ProbeConfig(MethodConfig):
    name: Literal["test_probe"] = "test_probe"
    grad_scale: float = 1.0


class ProbeRuntime(MethodRuntime):
    """Counts hook calls, scales gradients in its own step, and keeps a tensor that must survive resume."""

    def __init__(self, cfg: ProbeConfig) -> None:
        self.cfg = cfg
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.micro_steps = 0
        self.total = torch.zeros(3)
        self.loaded: dict | None = None

    def step(self, model, batch, accelerator, scale):
        self.micro_steps += 1
        return backprop_step(model, batch, accelerator, scale * self.cfg.grad_scale)

    def on_step_start(self, trainer) -> None:
        self.starts.append(trainer.state.step)

    def on_step_end(self, trainer) -> None:
        self.ends.append(trainer.state.step)
        self.total += 1

    def state(self) -> dict:
        return {"ends": len(self.ends)}

    def tensors(self) -> dict:
        return {"total": self.total}

    def load(self, state: dict, tensors: dict) -> None:
        self.loaded = {"state": state, "total": tensors["total"].clone()}
        self.total = tensors["total"].clone()

    def report(self) -> dict:
        return {"steps_seen": len(self.ends), "micro_steps": self.micro_steps, "total": float(self.total[0])}


RUNTIMES: list[ProbeRuntime] = []


def _runtime(model, cfg, ctx) -> ProbeRuntime:
    RUNTIMES.append(ProbeRuntime(cfg))
    return RUNTIMES[-1]


if "test_probe" not in available_methods():
    register(MethodSpec("test_probe", ProbeConfig, lambda model, cfg, ctx: model, runtime=_runtime))


def test_discovery_finds_every_method_module():
    assert {"full", "freeze", "lora"} <= set(available_methods())
    assert get_method("lora").name == "lora"


def test_hooks_and_custom_step_run_every_step(base_overrides):
    RUNTIMES.clear()
    cfg = load_config(
        None,
        [*base_overrides, "methods=[lora, test_probe]", "train.epochs=1", "train.grad_accum=2"],
    )
    summary = run_train(cfg)
    rt = RUNTIMES[-1]
    steps = summary["train"]["steps"]
    assert rt.starts == list(range(steps)) == rt.ends
    batches = -(-summary["data"]["train"] // 16)
    assert rt.micro_steps == batches  # the custom step replaced backprop for every micro-batch
    assert summary["method_reports"]["test_probe"] == {
        "steps_seen": steps,
        "micro_steps": batches,
        "total": float(steps),
    }


def test_zero_scaled_custom_step_leaves_weights_unchanged(base_overrides):
    """The trainer really uses the runtime's step: a step that yields zero gradients changes nothing."""
    RUNTIMES.clear()
    cfg = load_config(
        None,
        [*base_overrides, "methods=[lora, {name: test_probe, grad_scale: 0.0}]", "train.max_steps=5"],
    )
    run_train(cfg)
    from leantune.recipes.common import load_run_config, load_trained_model

    out = Path(cfg.output.dir)
    trained = load_trained_model(out, load_run_config(out))
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)  # B starts at zero and never moved


def test_runtime_state_survives_resume(base_overrides, tmp_path):
    RUNTIMES.clear()
    overrides = [*base_overrides, "methods=[lora, test_probe]", "train.max_steps=12", "train.save_every=4"]
    run_train(load_config(None, overrides))
    root = tmp_path / "run" / "checkpoints"
    state = json.loads((root / "step-00000008" / "trainer_state.json").read_text())
    assert state["methods"] == [{"ends": 8}]
    # Go back to the step-8 checkpoint as if the run had been killed there, and resume it.
    (root / "latest").write_text("step-00000008")
    (tmp_path / "run" / "summary.json").unlink()
    run_train(load_config(None, overrides), resume=True)
    rt = RUNTIMES[-1]
    assert rt.loaded is not None and rt.loaded["state"] == {"ends": 8}
    assert torch.equal(rt.loaded["total"], torch.full((3,), 8.0))
    assert rt.starts == [8, 9, 10, 11]
    assert float(rt.total[0]) == 12.0
