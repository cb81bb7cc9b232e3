"""LOMO / AdaLomo: LOMO's fused update equals plain SGD (with and without clipping, with weight decay),
at most one gradient is alive during backward, no gradient or AdamW state survives a step, AdaLomo's
loss falls on the toy task, and both resume exactly (AdaLomo's moments travel in the checkpoint)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from leantune.config import TrainConfig, load_config
from leantune.methods.lomo import AdaLomoConfig, AdaLomoRuntime, LomoConfig, LomoRuntime
from leantune.methods.registry import MethodRuntime
from leantune.recipes.train import prepare
from tests.conftest import assert_resume_replays, cli_err
from tests.live_bytes import LiveBytes

NO_DECAY = ("bias", "LayerNorm.weight")


def _tiny_bert(path: Path):
    from transformers import AutoModelForSequenceClassification

    # no dropout, so the reference and the fused run see the same function
    return AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    ).train()


def _batches(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(1000, 2000, (8, 12), generator=g),
            "attention_mask": torch.ones(8, 12, dtype=torch.long),
            "labels": torch.randint(0, 2, (8,), generator=g),
        }
        for _ in range(n)
    ]


def _sgd(model, lr: float, wd: float) -> torch.optim.SGD:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if any(k in n for k in NO_DECAY) else decay).append(p)
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )


class Backward:
    """The one accelerator method the runtime calls."""

    @staticmethod
    def backward(loss, **kwargs):
        loss.backward(**kwargs)


def _stub_trainer(model, lr: float, wd: float, max_grad_norm: float | None):
    return SimpleNamespace(
        torch_optimizer=_sgd(model, lr, wd),
        module=model,
        state=SimpleNamespace(step=0),
        cfg=SimpleNamespace(train=TrainConfig(max_grad_norm=max_grad_norm)),
        world=1,
    )


def _drive(rt: LomoRuntime, trainer, batches) -> None:
    rt.on_train_start(trainer)
    for s, batch in enumerate(batches):
        trainer.state.step = s
        rt.on_step_start(trainer)
        rt.step(trainer.module, batch, Backward, 1.0)
        rt.on_step_end(trainer)


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_lomo_equals_sgd(tiny_models, max_grad_norm):
    lr, wd, batches = 0.5, 0.01, _batches(3)
    ref = _tiny_bert(tiny_models["bert"])
    fused = copy.deepcopy(ref)
    sgd = _sgd(ref, lr, wd)
    for batch in batches:
        ref(**batch).loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), max_grad_norm)
        sgd.step()
        sgd.zero_grad(set_to_none=True)
    rt = LomoRuntime(LomoConfig())
    trainer = _stub_trainer(fused, lr, wd, max_grad_norm)
    _drive(rt, trainer, batches)
    with torch.no_grad():
        diff = max(
            float((a - b).abs().max()) for a, b in zip(ref.parameters(), fused.parameters(), strict=True)
        )
        moved = max(
            float((a - b).abs().max())
            for a, b in zip(ref.parameters(), _tiny_bert(tiny_models["bert"]).parameters(), strict=True)
        )
    print(f"lomo vs sgd (max_grad_norm={max_grad_norm}): max |diff| {diff:.2e}, max move {moved:.2e}")
    assert diff < 1e-6 and moved > 1e-3
    assert all(p.grad is None for p in fused.parameters()) and not trainer.torch_optimizer.state
    report = rt.report()
    assert report["backward_passes"] == (6 if max_grad_norm else 3)
    if max_grad_norm:
        assert report["clipped_steps"] == 3  # the clipping really acted


class LiveGrads:
    """Hooks registered before LOMO's: when one runs, its parameter's gradient is complete and not yet
    consumed, so the count includes it."""

    def __init__(self, model) -> None:
        self.params = list(model.parameters())
        self.peak = 0
        self.calls = 0
        for p in self.params:
            p.register_post_accumulate_grad_hook(self.count)

    def count(self, _p) -> None:
        self.calls += 1
        self.peak = max(self.peak, sum(q.grad is not None for q in self.params))


@pytest.mark.parametrize("runtime", [LomoRuntime(LomoConfig()), AdaLomoRuntime(AdaLomoConfig())])
def test_at_most_one_gradient_is_alive(tiny_models, runtime):
    model = _tiny_bert(tiny_models["bert"])
    live = LiveGrads(model)
    _drive(runtime, _stub_trainer(model, 1e-3, 0.0, 1.0), _batches(2))
    n = len(live.params)
    assert live.calls == 2 * 2 * n  # two passes (clipping) x two steps, every parameter
    assert live.peak == 1


def test_a_lomo_step_holds_fewer_bytes_than_an_adamw_step(tiny_models):
    model, batch = _tiny_bert(tiny_models["bert"]), _batches(1)[0]
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with LiveBytes() as adamw:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    rt = LomoRuntime(LomoConfig())
    with LiveBytes() as lomo:
        _drive(rt, _stub_trainer(model, 1e-4, 0.0, None), [batch])
    print(f"peak bytes: adamw {adamw.peak}, lomo {lomo.peak}, weights {params}")
    assert lomo.peak < adamw.peak / 3, (lomo.peak, adamw.peak)


def test_adalomo_update_matches_the_formula():
    """One AdaLomo update of a matrix and a vector against a plain re-computation (t = 1: beta2 = 0)."""
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(4, 6)), torch.nn.Parameter(torch.randn(6))
    gw, gb = torch.randn(4, 6), torch.randn(6)
    rt = AdaLomoRuntime(AdaLomoConfig())
    rt.names = {id(w): "w", id(b): "b"}
    rt.t = 1
    expected = []
    for p, g in ((w, gw), (b, gb)):
        sq = g**2 + 1e-30
        if p.ndim == 2:
            row, col = sq.mean(1), sq.mean(0)
            v = (row / row.mean()).unsqueeze(1) * col.unsqueeze(0)
        else:
            v = sq
        u = g / v.sqrt()
        u = u / max(1.0, float(u.pow(2).mean().sqrt()))
        alpha = 0.1 * max(1e-3, float(p.detach().pow(2).mean().sqrt()))
        expected.append(p.detach() * (1 - alpha * 0.5) - alpha * u)
    with torch.no_grad():
        rt.update(w, gw, 0.1, 0.5)
        rt.update(b, gb, 0.1, 0.5)
    assert torch.allclose(w, expected[0], atol=1e-6) and torch.allclose(b, expected[1], atol=1e-6)
    assert set(rt.tensors()) == {"w.row", "w.col", "b.v"}


class Probe(MethodRuntime):
    def __init__(self) -> None:
        self.grads: list[int] = []
        self.opt_state: list[int] = []

    def on_step_end(self, trainer) -> None:
        self.grads.append(sum(p.grad is not None for p in trainer.module.parameters()))
        self.opt_state.append(len(trainer.optimizer.optimizer.state))


def _losses(run_dir) -> list[float]:
    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r and r.get("split") is None]


def test_adalomo_loss_falls_with_no_gradient_or_adamw_state(base_overrides):
    overrides = [*base_overrides, "methods=[adalomo]", "train.lr=1e-1", "train.epochs=4", "train.log_every=4"]
    prep = prepare(load_config(None, overrides))
    prep.out.mkdir(parents=True, exist_ok=True)
    trainer = prep.trainer()
    probe = Probe()
    trainer.runtimes.append(probe)
    trainer.fit()
    losses = _losses(prep.out)
    print(f"adalomo losses: first {losses[0]:.4f}, last three {[round(x, 4) for x in losses[-3:]]}")
    assert sum(losses[-3:]) / 3 < 0.3 * losses[0], losses
    assert set(probe.grads) == {0} and set(probe.opt_state) == {0}
    report = trainer.runtimes[0].report()
    assert report["steps"] == len(probe.grads) and report["state_bytes"] > 0


def test_lora_then_lomo_tunes_lora_only(base_overrides):
    prep = prepare(load_config(None, [*base_overrides, "methods=[lora, lomo]", "train.max_steps=3"]))
    prep.out.mkdir(parents=True, exist_ok=True)
    initial = {n: p.detach().cpu().clone() for n, p in prep.model.named_parameters()}
    trainer = prep.trainer()
    trainer.fit()
    changed = {n for n, p in trainer.module.named_parameters() if not torch.equal(p.cpu(), initial[n])}
    trainable = {n for n, p in trainer.module.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable and any("lora_B" in n for n in changed)
    assert trainer.runtimes[0].report()["hooked_params"] == len(trainable)


@pytest.mark.parametrize("method", ["lomo", "adalomo"])
def test_resume_equals_an_uninterrupted_run(base_overrides, tmp_path, method):
    overrides = [*base_overrides, f"methods=[{method}]", "train.max_steps=4", "train.save_every=2"]
    if method == "lomo":
        overrides.append("train.lr=0.1")
    assert_resume_replays(overrides, tmp_path / "run", from_step=2)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["methods=[lomo]", "train.grad_accum=2"], "grad_accum"),
        (["methods=[adalomo]", "train.grad_accum=2"], "grad_accum"),
        (["methods=[lomo]", "train.adamw_impl=foreach"], "adamw_impl"),
        (["methods=[lomo, mezo]"], "mezo"),
        (["methods=[{name: adalomo, clip_threshold: 0}]"], "clip_threshold"),
    ],
)
def test_refusals_are_one_line(capsys, base_overrides, extra, needle):
    assert needle in cli_err(capsys, "train", *base_overrides, *extra)
