"""Optimisers and schedules named in `train`: each optimizer lowers the loss of the toy task, each
schedule's logged learning rates equal transformers.get_scheduler's for the same run, a resumed run
replays the uninterrupted one bit for bit whatever the optimizer (its state travels as safetensors +
JSON), and the settings that cannot work are refused in one line before anything is written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from leantune.config import load_config
from leantune.errors import UserError
from leantune.recipes.train import run_train
from tests.conftest import assert_resume_replays

#: train-section settings of each optimizer under test
OPTIMIZERS: dict[str, dict] = {
    "adamw": {},
    "adamw_fused": {"adamw_impl": "fused"},
    "adamw_8bit": {"optimizer": "adamw_8bit"},
    "adafactor": {"optimizer": "adafactor"},
    "sgd_nesterov": {"optimizer": "sgd", "momentum": 0.9, "nesterov": True, "lr": 0.1},
}
#: the optimizers whose loss must fall on the tiny BERT run (SGD: see the logistic-regression test)
ADAPTIVE = ["adamw", "adamw_fused", "adamw_8bit", "adafactor"]


def _train_keys(name: str) -> list[str]:
    return [f"train.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in OPTIMIZERS[name].items()]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ADAPTIVE)
def test_each_optimizer_lowers_the_loss(base_overrides, tmp_path, name):
    """Full fine-tuning of the tiny BERT for 3 epochs (51 steps): the mean loss of the last two logged
    windows of 10 steps is clearly below the first window's (which starts near ln 2)."""
    run_train(
        load_config(
            None,
            [
                *base_overrides,
                "methods=[full]",
                "train.log_every=10",
                "train.save_every=null",
                *_train_keys(name),
            ],
        )
    )
    losses = [r["loss"] for r in _records(tmp_path / "run") if "loss" in r and r.get("split") is None]
    print(f"{name}: losses per 10 steps {[round(x, 4) for x in losses]}")
    assert sum(losses[-2:]) / 2 < 0.8 * losses[0], losses


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_fits_a_logistic_regression(name):
    """Every optimizer, built by `make_optimizer` from the config, through 60 steps of the cosine schedule
    on a separable 2-class problem in 64 dimensions: the loss falls below a third of its start. SGD is
    only tested here: on the random-init tiny BERT it leaves the loss at ln 2 for 50-80 steps at lr
    0.05-0.3 (with or without momentum and clipping), where the adaptive optimizers learn the task."""
    from leantune.settings import TrainConfig
    from leantune.train.optim import make_optimizer, make_scheduler

    tc = TrainConfig(**{"lr": 0.05, "lr_scheduler": "cosine", "warmup_steps": 5, **OPTIMIZERS[name]})
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=gen)
    y = (x @ torch.randn(64, generator=gen) > 0).long()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 2))
    opt = make_optimizer(model, tc)
    sched = make_scheduler(opt, tc, 60)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss))
    print(f"{name}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < losses[0] / 3, losses[::10]


SCHEDULES = {
    "linear": [],
    "cosine": [],
    "constant_with_warmup": [],
    "cosine_with_restarts": ["train.lr_cycles=2"],
}


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_each_schedule_logs_transformers_rates(base_overrides, tmp_path, schedule):
    """The learning rate logged at every step equals transformers.get_scheduler's for 12 steps with 3
    warmup steps (built here independently, on a throwaway optimizer)."""
    from transformers import get_scheduler

    run_train(
        load_config(
            None,
            [
                *base_overrides,
                "methods=[full]",
                "train.max_steps=12",
                "train.log_every=1",
                "train.save_every=null",
                "train.warmup_steps=3",
                "train.lr=0.01",
                f"train.lr_scheduler={schedule}",
                *SCHEDULES[schedule],
            ],
        )
    )
    logged = [r["lr"] for r in _records(tmp_path / "run") if "lr" in r]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    extra = {"num_cycles": 2} if schedule == "cosine_with_restarts" else {}
    ref = get_scheduler(schedule, opt, 3, 12, scheduler_specific_kwargs=extra)
    expected = []
    for _ in range(12):
        expected.append(ref.get_last_lr()[0])
        opt.step()
        ref.step()
    assert logged == pytest.approx(expected, rel=1e-12, abs=0)
    assert logged[0] == 0.0 and max(logged) == pytest.approx(0.01)


@pytest.mark.parametrize("name", ["adamw_fused", "adamw_8bit", "adafactor", "sgd_nesterov"])
def test_resume_replays_every_optimizer(base_overrides, tmp_path, name):
    """Killed after the step-2 checkpoint and resumed: the weights end bit-identical to the run that went
    on (optimizer moments, bitsandbytes' quantisation maps and the schedule's position all restored)."""
    overrides = [
        *base_overrides,
        "methods=[full]",
        "train.max_steps=4",
        "train.save_every=2",
        "train.lr_scheduler=cosine",
        "train.warmup_steps=1",
        *_train_keys(name),
    ]
    assert_resume_replays(overrides, tmp_path / "run", from_step=2)
    saved = tmp_path / "run" / "checkpoints"
    assert not list(saved.rglob("*.pt")) and not list(saved.rglob("*.bin"))  # no pickles


def test_optimizer_state_round_trips_through_the_checkpoint_format():
    """bitsandbytes' nested quantisation state survives the safetensors + JSON split unchanged."""
    import bitsandbytes as bnb

    from leantune.train.checkpoint import _join_optimizer, _split_optimizer

    lin = torch.nn.Linear(128, 64)  # 8192 weights: above bitsandbytes' 4096 minimum for 8-bit state
    opt = bnb.optim.AdamW8bit(lin.parameters(), lr=1e-3)
    lin(torch.randn(4, 128)).square().mean().backward()
    opt.step()
    state = opt.state_dict()
    tensors, meta = _split_optimizer(state)
    back = _join_optimizer(tensors, json.loads(json.dumps(meta)))
    quant = back["state"][0]["__bnb_optimizer_quant_state__"]
    assert quant["state1"].dtype == torch.uint8
    for key, value in state["state"][0]["__bnb_optimizer_quant_state__"].items():
        assert torch.equal(quant[key], value), key


@pytest.mark.parametrize(
    ("overrides", "phrase"),
    [
        (["train.optimizer=adamw_9bit"], "train.optimizer"),
        (["train.lr=-1e-3"], "greater than 0"),
        (["train.momentum=0.9"], "applies to optimizer sgd"),
        (["train.optimizer=sgd", "train.nesterov=true"], "needs train.momentum > 0"),
        (["train.optimizer=sgd", "train.adamw_impl=fused"], "applies to optimizer adamw"),
        (["train.lr_cycles=3"], "cosine_with_restarts"),
        (["train.warmup_steps=10", "train.max_steps=5"], "exceeds train.max_steps=5"),
    ],
)
def test_bad_optimizer_settings_are_config_errors(base_overrides, overrides, phrase):
    with pytest.raises(UserError, match=phrase):
        load_config(None, [*base_overrides, *overrides])


def test_warmup_longer_than_the_run_is_refused_before_writing(base_overrides, tmp_path):
    cfg = load_config(None, [*base_overrides, "train.epochs=1", "train.warmup_steps=500"])
    with pytest.raises(UserError, match="exceeds the 17 optimizer steps"):
        run_train(cfg)
    assert not (tmp_path / "run").exists()


def test_paged_optimizer_is_refused_without_cuda(base_overrides, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: paged optimizers run")
    cfg = load_config(None, [*base_overrides, "train.optimizer=paged_adamw_8bit"])
    with pytest.raises(UserError, match="no CUDA GPU"):
        run_train(cfg)
    assert not (tmp_path / "run").exists()


def test_eight_bit_without_bitsandbytes_names_the_install(base_overrides, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    cfg = load_config(None, [*base_overrides, "train.optimizer=adamw_8bit"])
    with pytest.raises(UserError, match="pip install"):
        run_train(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["mezo", "lomo", "adalomo"])
def test_own_update_methods_refuse_an_optimizer_they_ignore(base_overrides, method):
    cfg = load_config(None, [*base_overrides, f"methods=[{method}]", "train.optimizer=sgd"])
    with pytest.raises(UserError, match="does not use train.optimizer"):
        run_train(cfg)


def test_dynamic_rank_refuses_another_optimizer(base_overrides):
    cfg = load_config(
        None, [*base_overrides, "methods=[{name: dynamic_rank, budget: 1GiB}]", "train.optimizer=adafactor"]
    )
    with pytest.raises(UserError, match="dynamic_rank plans its memory"):
        run_train(cfg)


def test_auto_adamw_is_fused_only_where_every_parameter_takes_it():
    """`adamw_impl: auto` picks torch's fused kernel for plain floating-point tensors on a device that has
    it, and leaves the choice to torch otherwise (a tensor subclass such as FSDP2's DTensor, a device
    without the kernel)."""
    from leantune.train.optim import build_optimizer, fused_capable

    class Sub(torch.Tensor):
        pass

    model = torch.nn.Linear(4, 2)
    assert fused_capable(list(model.parameters()))
    assert all(g["fused"] for g in build_optimizer(model, 1e-3, 0.01).param_groups)
    assert not fused_capable([torch.zeros(2).as_subclass(Sub)])
    assert not fused_capable([torch.zeros(2, device="meta")])
    assert not fused_capable([torch.zeros(2, dtype=torch.int64)])
    loop = build_optimizer(model, 1e-3, 0.01, "for_loop")
    assert all(not g["fused"] and g["foreach"] is False for g in loop.param_groups)
