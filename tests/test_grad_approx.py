"""grad_approx: G learns the true gradient on a toy problem, the guard falls back to exact steps, exact
mode is plain LoRA on the upper blocks, skip mode leaves the weights bit-identical on skipped steps, and
--resume continues exactly (G's weights and optimizer state included)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import pytest
import torch

from leantune.config import Config, load_config
from leantune.data.tasks import collate
from leantune.methods import MethodContext
from leantune.methods.grad_approx import GradApproxRuntime, is_calibration_step
from leantune.methods.registry import MethodConfig, MethodRuntime, MethodSpec, available_methods, register
from leantune.recipes.train import prepare, run_train
from tests.conftest import cli_err


def _digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        if p.requires_grad:
            h.update(name.encode() + p.detach().numpy().tobytes())
    return h.hexdigest()


class WatchConfig(MethodConfig):
    name: Literal["test_watch_steps"] = "test_watch_steps"


class WatchRuntime(MethodRuntime):
    """Records, per step, the kind grad_approx chose and whether the trainable weights changed."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool]] = []

    def on_step_start(self, trainer) -> None:
        self._before = _digest(trainer.module)

    def on_step_end(self, trainer) -> None:
        kind = next(rt.kind for rt in trainer.runtimes if isinstance(rt, GradApproxRuntime))
        self.seen.append((kind, _digest(trainer.module) != self._before))


WATCHERS: list[WatchRuntime] = []


def _watch(model, cfg, ctx) -> WatchRuntime:
    WATCHERS.append(WatchRuntime())
    return WATCHERS[-1]


if "test_watch_steps" not in available_methods():
    register(MethodSpec("test_watch_steps", WatchConfig, lambda model, cfg, ctx: model, runtime=_watch))


def _run(base_overrides, *extra: str) -> dict:
    return run_train(load_config(None, [*base_overrides, *extra]))


def _losses(run_dir: Path) -> list[float]:
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r and r.get("split") is None]


class _PlainBackward:
    def backward(self, loss):
        loss.backward()


@pytest.mark.parametrize("target", ["lora", "prompt"])
def test_approximator_converges_to_the_true_gradient_on_a_fixed_batch(base_overrides, target):
    """Toy problem: frozen model, one fixed batch; G's estimate must approach the exact site gradients.

    The cosine is measured on each calibration step *before* G learns from it, between the parameter
    gradients formed from G's estimate and those formed from the true site gradients."""
    cfg = load_config(
        None,
        [*base_overrides, f"methods=[{{name: grad_approx, target: {target}, split_layer: 1, g_lr: 3e-3}}]"],
    )
    prep = prepare(cfg)
    for m in prep.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    rt = GradApproxRuntime(prep.model, cfg.methods[0], MethodContext("classification", 0))
    batch = collate(prep.data["train"][:16], prep.tokenizer.pad_token_id)
    first, last = None, None
    for _ in range(100):
        rt._micro_cos = []
        rt._calibration_step(prep.model, batch, _PlainBackward(), 1.0)
        prep.model.zero_grad(set_to_none=True)
        mean = sum(rt._micro_cos[0]) / len(rt._micro_cos[0])
        first = mean if first is None else first
        last = rt._micro_cos[0]
    assert abs(first) < 0.5  # an untrained G knows nothing
    assert min(last) > 0.9, last


def test_guard_falls_back_to_exact_steps_when_the_estimate_is_poor(base_overrides):
    common = [*base_overrides, "train.max_steps=12", "train.save_every=null"]
    never = "methods=[{name: grad_approx, split_layer: 1, guard_cosine: -1.0, calib_end: 0.25}]"
    report = _run(common, never)["method_reports"]["grad_approx"]
    scheduled = sum(is_calibration_step(load_config(None, [never]).methods[0], s) for s in range(12))
    assert report["steps"]["exact"] == scheduled and report["steps"]["approx"] == 12 - scheduled > 0
    assert report["fallback_steps"] == 0
    # A guard no estimate can pass: after the first calibration step every step is exact.
    always = "methods=[{name: grad_approx, split_layer: 1, guard_cosine: 0.999, guard_patience: 1}]"
    report = _run([*common, "output.overwrite=true"], always)["method_reports"]["grad_approx"]
    assert report["steps"] == {"exact": 12, "approx": 0, "skip": 0}
    assert report["fallback_steps"] == 11
    assert max(report["cosine_last_20pct"]) < 0.999


def test_exact_mode_is_plain_lora_on_the_upper_blocks(base_overrides, tmp_path):
    common = [*base_overrides, "train.epochs=1", "train.log_every=1"]
    ga = _run(common, "methods=[{name: grad_approx, mode: exact, split_layer: 1, dropout: 0.1}]")
    targets = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in (1, 2) for m in ("query", "value")]
    plain = f"methods=[{{name: lora, r: 8, alpha: 16, dropout: 0.1, target_modules: {targets}}}]"
    lora = _run([*common, f"output.dir={tmp_path / 'plain'}"], plain)
    assert ga["params"]["trainable"] == lora["params"]["trainable"]
    a, b = _losses(tmp_path / "run"), _losses(tmp_path / "plain")
    assert len(a) == len(b) == ga["train"]["steps"]
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5
    assert ga["test"]["loss"] == pytest.approx(lora["test"]["loss"], abs=1e-5)


@pytest.mark.skipif(
    "cache_frozen_prefix" not in type(Config().train).model_fields,
    reason="train.cache_frozen_prefix lands with branch prefix-cache; this test runs once it is merged",
)
@pytest.mark.parametrize("mode", ["exact", "approx"])
def test_frozen_prefix_cache_serves_the_encoder_without_changing_the_losses(
    base_overrides, tmp_path, monkeypatch, mode
):
    """The encoder (blocks below the split) is a frozen prefix: the cache serves it from epoch 2 on, and
    the losses equal those of the same run computing the (eval-mode) prefix every time."""
    from leantune.train import prefix_cache

    method = f"methods=[{{name: grad_approx, mode: {mode}, split_layer: 2, guard_cosine: -1.0}}]"
    common = [*base_overrides, method, "train.log_every=1", "train.cache_frozen_prefix=true"]
    cached = _run(common)
    assert cached["train"]["prefix_cache"]["frozen_blocks"] == 2
    assert cached["train"]["prefix_cache"]["micro_batches_from_cache"] > 0
    monkeypatch.setattr(prefix_cache, "SERVE_FROM_CACHE", False)
    computed = _run([*common, f"output.dir={tmp_path / 'computed'}"])
    assert computed["train"]["prefix_cache"]["micro_batches_from_cache"] == 0
    a, b = _losses(tmp_path / "run"), _losses(tmp_path / "computed")
    assert len(a) == len(b) == cached["train"]["steps"]
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5


def test_skip_mode_changes_no_weight_on_skipped_steps(base_overrides):
    WATCHERS.clear()
    method = "{name: grad_approx, mode: skip, split_layer: 1, calib_start: 0.5, calib_end: 0.25}"
    _run(
        base_overrides,
        f"methods=[{method}, test_watch_steps]",
        "train.max_steps=12",
        "train.weight_decay=0.1",
        "train.warmup_ratio=0",  # so the first exact step already has lr > 0
    )
    seen = WATCHERS[-1].seen
    skipped = [changed for kind, changed in seen if kind == "skip"]
    exact = [changed for kind, changed in seen if kind == "exact"]
    assert len(seen) == 12 and skipped and exact
    assert not any(skipped)  # bit-identical across every skipped step, weight decay included
    assert all(exact)


def test_approx_mode_trains_and_resumes_exactly(base_overrides, tmp_path):
    method = (
        "methods=[{name: grad_approx, split_layer: 1, guard_cosine: -1.0, calib_end: 0.25, dropout: 0.1}]"
    )
    overrides = [*base_overrides, method, "train.max_steps=12", "train.save_every=4", "train.log_every=1"]
    first = run_train(load_config(None, overrides))
    report = first["method_reports"]["grad_approx"]
    assert report["steps"]["approx"] > 0 and report["g_params"] > 0
    root = tmp_path / "run" / "checkpoints"
    (root / "latest").write_text("step-00000008")
    (tmp_path / "run" / "summary.json").unlink()
    again = run_train(load_config(None, overrides), resume=True)
    assert again["train"]["resumed"]
    assert again["weights_sha256_per_rank"] == first["weights_sha256_per_rank"]
    resumed = again["method_reports"]["grad_approx"]
    for key in ("steps", "cosine_first_20pct", "cosine_last_20pct", "fallback_steps"):
        assert resumed[key] == report[key]


@pytest.mark.parametrize("target", ["lora", "prompt"])
def test_approx_steps_update_the_weights_under_bf16_autocast(base_overrides, target):
    """accelerate's autocast wraps only model.forward: the captured activations are bf16 while G, the
    approx step's head call and the gradient formulas run beside fp32 weights (this crashed once)."""
    WATCHERS.clear()
    approx = f"{{name: grad_approx, split_layer: 1, guard_cosine: -1.0, target: {target}}}"
    method = f"methods=[{approx}, test_watch_steps]"
    summary = _run(base_overrides, method, "train.max_steps=8", "train.mixed_precision=bf16")
    assert summary["method_reports"]["grad_approx"]["steps"]["approx"] > 0
    seen = WATCHERS[-1].seen
    assert any(kind == "approx" for kind, _ in seen)
    assert all(changed for kind, changed in seen if kind == "approx")  # every approx step moved the weights
    assert all(torch.isfinite(torch.tensor(loss)) for loss in _losses(Path(summary["run_dir"])))


def test_bad_settings_are_one_line_errors(capsys, base_overrides):
    err = cli_err(capsys, "train", *base_overrides, "methods=[{name: grad_approx, split_layer: 3}]")
    assert "split_layer=3" in err and "between 1 and 2" in err
    err = cli_err(
        capsys,
        "train",
        *base_overrides,
        "methods=[{name: grad_approx, split_layer: 1, target_modules: [nope]}]",
    )
    assert "nope" in err
    err = cli_err(
        capsys, "train", *base_overrides, "methods=[{name: grad_approx, calib_start: 0.1, calib_end: 0.5}]"
    )
    assert "calib_end" in err


def test_calibration_schedule_follows_the_decaying_fraction():
    from leantune.methods.grad_approx import calibration_fraction

    cfg = load_config(
        None, ["methods=[{name: grad_approx, calib_start: 0.5, calib_end: 0.1, calib_decay_steps: 40}]"]
    )
    ga = cfg.methods[0]
    flags = [is_calibration_step(ga, s) for s in range(200)]
    assert flags[0]
    for n in (10, 40, 77, 200):
        expected = sum(calibration_fraction(ga, s) for s in range(n))
        assert abs(sum(flags[:n]) - expected) < 1.0  # the count tracks sum(p) to within one step
    assert sum(flags[:40]) == 13 and sum(flags[40:]) == 16  # ceil(12.2), then 0.1 of the 160 steps


def _fixed_batch_runtime(base_overrides, method: str):
    cfg = load_config(None, [*base_overrides, f"methods=[{method}]"])
    prep = prepare(cfg)
    for m in prep.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    rt = GradApproxRuntime(prep.model, cfg.methods[0], MethodContext("classification", 0))
    return rt, prep.model, collate(prep.data["train"][:16], prep.tokenizer.pad_token_id)


def test_task_loss_alone_teaches_g_a_descent_direction(base_overrides):
    """Cosine term off: G learns only from L(theta - lr * g_hat). The model stays fixed (one batch, no
    optimizer step), so the look-ahead loss can only fall because G's update got better."""
    method = "{name: grad_approx, split_layer: 1, match_weight: 0, task_loss_weight: 1, task_loss_lr: 100.0}"
    rt, model, batch = _fixed_batch_runtime(base_overrides, method)
    g_before = [p.detach().clone() for p in rt.g.parameters()]
    rt._calibration_step(model, batch, _PlainBackward(), 1.0)
    assert rt.task_grad_norm > 0  # the task term reaches G's parameters ...
    model_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    for _ in range(29):
        rt._calibration_step(model, batch, _PlainBackward(), 1.0)
        model.zero_grad(set_to_none=True)
    assert len(rt.lookahead) == 30
    assert len({round(row[0], 6) for row in rt.lookahead}) == 1  # the model itself never moved
    before, first_after, last_after = rt.lookahead[0][0], rt.lookahead[0][1], rt.lookahead[-1][1]
    # The tiny random model sits near ln 2, so changes are small; G's step lowers the loss by 1e-4 or
    # more at the end, at least 5x what the untrained G's step did.
    assert before - last_after > max(1e-4, 5 * (before - first_after)), rt.lookahead
    assert any(not torch.equal(a, b) for a, b in zip(g_before, rt.g.parameters(), strict=True))
    # Without the task term nothing of it is computed or reaches G.
    rt0, model0, batch0 = _fixed_batch_runtime(base_overrides, "{name: grad_approx, split_layer: 1}")
    rt0._calibration_step(model0, batch0, _PlainBackward(), 1.0)
    assert rt0.task_grad_norm == 0.0 and rt0.lookahead == []
    # ... but never the model's own gradients: those stay the exact backprop ones.
    plain_grads = [p.grad for p in model0.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(model_grads, plain_grads, strict=True))


def test_task_loss_run_reports_the_lookahead_and_resumes_exactly(base_overrides, tmp_path):
    ga = "{name: grad_approx, split_layer: 1, guard_cosine: -1, task_loss_weight: 1, dropout: 0.1}"
    method = f"methods=[{ga}]"
    overrides = [*base_overrides, method, "train.max_steps=8", "train.save_every=4"]
    first = run_train(load_config(None, overrides))
    look = first["method_reports"]["grad_approx"]["lookahead"]
    assert look["calibration_batches"] == first["method_reports"]["grad_approx"]["calibration_steps"]
    assert look["inner_lr"] == load_config(None, overrides).train.lr
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-00000004")
    (tmp_path / "run" / "summary.json").unlink()
    again = run_train(load_config(None, overrides), resume=True)
    assert again["weights_sha256_per_rank"] == first["weights_sha256_per_rank"]
    assert again["method_reports"]["grad_approx"]["lookahead"] == look


def test_eval_of_a_prompt_run_reattaches_the_prompt(base_overrides, tmp_path):
    from leantune.models.loader import load_model
    from leantune.recipes.common import load_run_config, load_trained_model
    from leantune.recipes.evaluate import run_eval

    method = "methods=[{name: grad_approx, target: prompt, split_layer: 1, mode: exact}]"
    summary = _run(base_overrides, method, "train.lr=0.02", "train.max_steps=6")
    run_dir = tmp_path / "run"
    metrics = run_eval(run_dir, None)
    assert metrics["loss"] == pytest.approx(summary["test"]["loss"], abs=1e-5)
    assert metrics["accuracy"] == summary["test"]["accuracy"]
    cfg = load_run_config(run_dir)
    ids = torch.randint(5, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        with_prompt = load_trained_model(run_dir, cfg).eval()(**batch).logits
        saved = load_model(str(run_dir / "model"), cfg.task, cfg.model.dtype, cfg.data.label_names)
        plain = saved.eval()(**batch).logits  # what the loader returned before the reload hook
    assert (with_prompt - plain).abs().max() > 1e-3  # without re-attaching, eval would score another model
