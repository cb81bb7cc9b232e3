"""MeZO: the SPSA estimate points along the true gradient, the loss falls, no gradient and no optimizer
state ever exist, a step holds far fewer bytes than an AdamW step, dropout cannot break the two-point
estimate, `[lora, mezo]` moves LoRA only, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from leantune.config import load_config
from leantune.errors import UserError
from leantune.methods.mezo import MezoConfig, MezoRuntime, perturb, step_seed
from leantune.methods.registry import MethodRuntime
from leantune.recipes.train import prepare
from tests.conftest import assert_resume_replays, cli_err
from tests.live_bytes import LiveBytes


class Quadratic(torch.nn.Module):
    """L(theta) = 1/2 (theta - t)^T A (theta - t) with a fixed SPD A: the true gradient is known."""

    def __init__(self, d: int = 40) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        m = torch.randn(d, d, generator=g) / d**0.5
        self.register_buffer("a", m @ m.T + 0.5 * torch.eye(d))
        self.register_buffer("target", torch.randn(d, generator=g))
        self.theta = torch.nn.Parameter(torch.zeros(d))

    def forward(self, **batch):
        e = self.theta - self.target
        return SimpleNamespace(loss=0.5 * e @ self.a @ e)


def _stub_trainer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0):
    """What the runtime reads from the trainer: the optimizer's groups (lr, weight decay) and the step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD([{"params": params, "weight_decay": weight_decay}], lr=lr)
    return SimpleNamespace(torch_optimizer=opt, state=SimpleNamespace(step=0))


def _run_steps(rt: MezoRuntime, model, trainer, steps: int, batch=None) -> list[float]:
    losses = []
    for s in range(steps):
        trainer.state.step = s
        rt.on_step_start(trainer)
        losses.append(float(rt.step(model, batch or {}, None, 1.0)))
        rt.on_step_end(trainer)
    return losses


def test_seeds_depend_only_on_seed_step_and_sample():
    assert step_seed(0, 3, 1) == step_seed(0, 3, 1)
    assert len({step_seed(0, s, k) for s in range(20) for k in range(3)}) == 60
    assert step_seed(1, 0, 0) != step_seed(0, 0, 0) and step_seed(-1, 0, 0) != step_seed(0, 0, 0)


def test_perturbation_is_regenerated_and_restored():
    w = torch.randn(3, 300_000)  # several chunks of z
    before = w.clone()
    perturb([w], 7, 1e-3)
    moved = w - before
    perturb([w], 7, -2e-3)
    perturb([w], 7, 1e-3)
    assert torch.allclose(w, before, atol=1e-6) and moved.abs().max() > 1e-4
    z = torch.zeros(3, 300_000)
    perturb([z], 7, 1.0)
    assert torch.allclose(moved, 1e-3 * z, atol=1e-6)  # the same z, regenerated from the seed
    assert abs(float(z.std()) - 1.0) < 0.01


def test_spsa_estimate_is_the_gradient_in_expectation():
    """E[g_k z_k] = grad L (for small eps): the mean over many samples has cosine ~1 with it."""
    model = Quadratic()
    n = 4000
    rt = MezoRuntime(MezoConfig(n_spsa=n, eps=1e-3), seed=0)
    rt.on_step_start(_stub_trainer(model, lr=0.0))
    rt.step(model, {}, None, 1.0)
    estimate = torch.zeros_like(model.theta)
    for seed, g in zip(rt.seeds, rt.projected, strict=True):
        z = torch.zeros_like(model.theta)
        perturb([z], seed, 1.0)
        estimate += g * z / n
    true = model.a @ (model.theta.detach() - model.target)
    cosine = float(torch.nn.functional.cosine_similarity(estimate, true, dim=0))
    assert cosine > 0.95, cosine
    # lr 0: 4000 perturbations undone up to float rounding (+eps, -2 eps, +eps do not cancel bit-exactly)
    assert model.theta.abs().max() < 1e-7


def test_loss_falls_on_a_quadratic_with_no_gradient_ever():
    model = Quadratic()
    trainer = _stub_trainer(model, lr=0.02)
    rt = MezoRuntime(MezoConfig(), seed=0)
    losses = _run_steps(rt, model, trainer, 300)
    assert sum(losses[-10:]) / 10 < 0.2 * losses[0], (losses[0], losses[-1])
    assert model.theta.grad is None and not trainer.torch_optimizer.state
    assert rt.report()["forward_passes"] == 600


def test_weight_decay_and_samples_follow_the_formula():
    """theta <- theta - lr * (wd * theta + mean_k g_k z_k), checked against an explicit computation."""
    model = Quadratic(8)
    with torch.no_grad():
        model.theta.fill_(0.5)
    lr, wd, n = 0.1, 0.3, 3
    rt = MezoRuntime(MezoConfig(n_spsa=n), seed=5)
    trainer = _stub_trainer(model, lr=lr, weight_decay=wd)
    rt.on_step_start(trainer)
    rt.step(model, {}, None, 1.0)
    theta0 = model.theta.detach().clone()
    expected = theta0 - lr * wd * theta0
    for seed, g in zip(rt.seeds, rt.projected, strict=True):
        z = torch.zeros_like(theta0)
        perturb([z], seed, 1.0)
        expected -= lr * g * z / n
    rt.on_step_end(trainer)
    assert torch.allclose(model.theta, expected, atol=1e-6)


class TwoGroups(torch.nn.Module):
    """A weight and a bias, as the trainer groups them (decay / no decay), each with its own rate."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((6,), 0.5))
        self.b = torch.nn.Parameter(torch.full((3,), -0.5))

    def forward(self, **_):
        return SimpleNamespace(loss=(self.w**2).sum() + (self.b - 1).pow(2).sum())


def test_every_group_moves_along_the_direction_the_forward_passes_measured():
    """One z stream over all parameters: the bias group's update uses the z of its own entries in that
    stream (a fresh generator per group gave the bias an unrelated direction)."""
    model = TwoGroups()
    opt = torch.optim.SGD([{"params": [model.w], "lr": 0.1}, {"params": [model.b], "lr": 0.02}], lr=0.1)
    trainer = SimpleNamespace(torch_optimizer=opt, state=SimpleNamespace(step=0))
    rt = MezoRuntime(MezoConfig(), seed=3)
    rt.on_step_start(trainer)
    rt.step(model, {}, None, 1.0)
    w0, b0 = model.w.detach().clone(), model.b.detach().clone()
    z_w, z_b = torch.zeros(6), torch.zeros(3)
    perturb([z_w, z_b], rt.seeds[0], 1.0)  # the stream the passes used, over [w, b]
    rt.on_step_end(trainer)
    g = rt.projected[0]
    assert torch.allclose(model.w, w0 - 0.1 * g * z_w, atol=1e-6)
    assert torch.allclose(model.b, b0 - 0.02 * g * z_b, atol=1e-6)


def _tiny_bert_and_batch(path: Path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=2)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 2000, (16, 16), generator=g),
        "attention_mask": torch.ones(16, 16, dtype=torch.long),
        "labels": torch.randint(0, 2, (16,), generator=g),
    }
    return model.train(), batch


def test_dropout_cannot_break_the_estimate(tiny_models):
    """The tiny BERT has dropout 0.1: both passes still see one function, so a step is repeatable."""
    model, batch = _tiny_bert_and_batch(tiny_models["bert"])
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    rt = MezoRuntime(MezoConfig(), seed=0)
    trainer = _stub_trainer(model, lr=0.0)
    rt.on_step_start(trainer)
    rt.step(model, batch, None, 1.0)
    first = list(rt.projected)
    rt.on_step_start(trainer)
    rt.step(model, batch, None, 1.0)
    assert rt.projected == first and first[0] != 0.0
    assert model.training and all(m.training for m in model.modules())  # modes restored


def test_a_mezo_step_holds_far_fewer_bytes_than_an_adamw_step(tiny_models):
    model, batch = _tiny_bert_and_batch(tiny_models["bert"])
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with LiveBytes() as adamw:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    rt = MezoRuntime(MezoConfig(), seed=0)
    trainer = _stub_trainer(model, lr=1e-4)
    with LiveBytes() as mezo:
        _run_steps(rt, model, trainer, 1, batch)
    print(f"peak bytes: adamw {adamw.peak}, mezo {mezo.peak}, weights {params}")
    assert adamw.peak > 2.5 * params  # gradients + two moments
    assert mezo.peak < adamw.peak / 5, (mezo.peak, adamw.peak)
    assert all(p.grad is None for p in model.parameters()) and not trainer.torch_optimizer.state


class Probe(MethodRuntime):
    """Runs after mezo's hooks: no .grad and no optimizer state at any step end."""

    def __init__(self) -> None:
        self.grads: list[int] = []
        self.opt_state: list[int] = []

    def on_step_end(self, trainer) -> None:
        self.grads.append(sum(p.grad is not None for p in trainer.module.parameters()))
        self.opt_state.append(len(trainer.optimizer.optimizer.state))


def _fit(overrides: list[str]):
    prep = prepare(load_config(None, overrides))
    prep.out.mkdir(parents=True, exist_ok=True)
    initial = {n: p.detach().cpu().clone() for n, p in prep.model.named_parameters()}
    trainer = prep.trainer()
    probe = Probe()
    trainer.runtimes.append(probe)
    trainer.fit()
    return trainer, probe, initial


def test_full_mezo_moves_every_weight_without_gradients(base_overrides):
    trainer, probe, initial = _fit(
        [*base_overrides, "methods=[mezo]", "train.max_steps=3", "train.weight_decay=0.1", "train.lr=1e-3"]
    )
    assert probe.grads == [0, 0, 0] and probe.opt_state == [0, 0, 0]
    for name, p in trainer.module.named_parameters():
        assert not torch.equal(p.cpu(), initial[name]), name  # every parameter is perturbed and updated
    report = trainer.runtimes[0].report()
    assert report["steps"] == 3 and report["forward_passes"] == 6
    assert report["dropout_modules_disabled"] > 0


def test_lora_then_mezo_tunes_lora_only(base_overrides):
    trainer, probe, initial = _fit([*base_overrides, "methods=[lora, mezo]", "train.max_steps=3"])
    assert probe.grads == [0, 0, 0] and probe.opt_state == [0, 0, 0]
    changed = {n for n, p in trainer.module.named_parameters() if not torch.equal(p.cpu(), initial[n])}
    trainable = {n for n, p in trainer.module.named_parameters() if p.requires_grad}
    assert changed == trainable and any("lora_B" in n for n in changed)


def test_resume_equals_an_uninterrupted_run(base_overrides, tmp_path):
    overrides = [
        *base_overrides,
        "methods=[mezo]",
        "train.max_steps=4",
        "train.save_every=2",
        "train.lr=1e-3",
    ]
    assert_resume_replays(overrides, tmp_path / "run", from_step=2)


@pytest.mark.parametrize(
    ("method", "needle"),
    [("{name: mezo, eps: 0}", "eps"), ("{name: mezo, n_spsa: 0}", "n_spsa")],
)
def test_bad_settings_are_one_line(method, needle):
    with pytest.raises(UserError) as err:
        load_config(None, [f"methods=[{method}]"])
    assert needle in str(err.value) and "\n" not in str(err.value).strip()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["methods=[mezo, lomo]"], "lomo"),
        (["methods=[mezo]", "train.max_grad_norm=0.5"], "max_grad_norm"),  # the default 1.0 passes
        (["methods=[mezo]", "train.adamw_impl=fused"], "adamw_impl"),
    ],
)
def test_conflicting_options_are_one_line(capsys, base_overrides, extra, needle):
    line = cli_err(capsys, "train", *base_overrides, *extra)
    assert line.startswith("error") or "mezo" in line
    assert needle in line
