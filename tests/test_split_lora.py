"""SplitLoRA-style training: client adapters equal their mean after each round and differ within one,
loss goes down, the saved (averaged) adapter loads in peft, and --resume is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from leantune.config import load_config
from leantune.methods.registry import MethodRuntime
from leantune.recipes.train import prepare, run_train
from tests.conftest import cli_err

LEARNS = ["r: 16", "dropout: 0.0", "target_modules: all-linear"]  # LoRA on a random base: see test_train


def _method(**fields) -> str:
    extra = [f"{k}: {v}" for k, v in fields.items()]
    return "methods=[{" + ", ".join(["name: split_lora", *LEARNS, *extra]) + "}]"


class BeforeRound(MethodRuntime):
    """Runs before split_lora's hooks end a step: what each client holds once this step's update is in."""

    def __init__(self, split) -> None:
        self.split = split
        self.expected_means: dict[int, dict[str, torch.Tensor]] = {}
        self.spread: dict[int, float] = {}  # max difference between two clients, by step

    def on_step_end(self, trainer) -> None:
        step, split = trainer.state.step, self.split
        clients = [dict(c) for c in split.clients]
        clients[split.client_of(step)] = {n: p.detach().clone() for n, p in split.lower.items()}
        self.spread[step] = max(
            float((a[n] - b[n]).abs().max()) for a in clients for b in clients for n in split.lower
        )
        self.expected_means[step] = {n: torch.stack([c[n] for c in clients]).mean(0) for n in split.lower}


class AfterRound(MethodRuntime):
    """Runs after split_lora's hooks: whether every client (and the model) now holds the same adapter."""

    def __init__(self, split, before: BeforeRound) -> None:
        self.split, self.before = split, before
        self.all_equal_mean: dict[int, bool] = {}

    def on_step_end(self, trainer) -> None:
        step, split = trainer.state.step, self.split
        mean = self.before.expected_means[step]
        self.all_equal_mean[step] = all(
            torch.allclose(c[n], mean[n], atol=1e-7) and torch.allclose(p, mean[n], atol=1e-7)
            for c in split.clients
            for n, p in split.lower.items()
        )


def test_clients_are_averaged_each_round_and_differ_within_it(base_overrides, tmp_path):
    rounds_every, steps = 4, 12
    prep = prepare(
        load_config(
            None,
            [
                *base_overrides,
                _method(clients=2, rounds_every=rounds_every),
                f"train.max_steps={steps}",
                "train.warmup_ratio=0",
            ],
        )
    )
    prep.out.mkdir(parents=True, exist_ok=True)
    trainer = prep.trainer()
    split = trainer.runtimes[0]
    before = BeforeRound(split)
    after = AfterRound(split, before)
    trainer.runtimes = [before, split, after]
    trainer.fit()

    assert split.lower and all(".layer.0." in n and "lora_" in n for n in split.lower)
    round_ends = [s for s in range(steps) if (s + 1) % rounds_every == 0]
    assert split.rounds == len(round_ends) and split.client_steps == [steps // 2] * 2
    for s in range(steps):
        if s in round_ends:
            assert after.all_equal_mean[s], s  # FedAvg: every client holds the uniform mean
            assert before.spread[s] > 0, s  # ... of clients that really differed
        else:
            assert not after.all_equal_mean[s], s
    # within a round, once both clients have trained, their adapters differ
    assert all(before.spread[s] > 1e-6 for s in range(steps) if s % rounds_every >= 1)

    # the saved adapter is a plain peft adapter holding the averaged client part
    from peft import PeftModel

    from leantune.models.loader import load_model

    trainer.module.save_pretrained(str(tmp_path / "adapter"))
    cfg = prep.cfg
    base = load_model(cfg.model.name, cfg.task, cfg.model.dtype, cfg.data.label_names)
    loaded = dict(PeftModel.from_pretrained(base, str(tmp_path / "adapter")).named_parameters())
    for name, value in split.average.items():
        assert torch.equal(loaded[name], value), name
        assert all(torch.equal(c[name], value) for c in split.clients)


def test_loss_goes_down_and_the_adapter_loads(base_overrides, tmp_path):
    overrides = [*base_overrides, _method(clients=2, rounds_every=4), "train.lr=5e-3", "train.epochs=10"]
    summary = run_train(load_config(None, [*overrides, "train.log_every=5"]))
    lines = Path(summary["run_dir"], "metrics.jsonl").read_text().splitlines()
    losses = [r["loss"] for r in map(json.loads, lines) if "loss" in r and r.get("split") is None]
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    assert summary["test"]["accuracy"] >= summary["test"]["majority_accuracy"] + 0.2, summary["test"]
    report = summary["method_reports"]["split_lora"]
    assert report["rounds"] == -(-summary["train"]["steps"] // 4)  # the last, partial round is closed too
    assert report["client_lora_params"] > 0

    from leantune.recipes.common import load_run_config, load_trained_model

    out = Path(summary["run_dir"])
    assert (out / "model" / "adapter_config.json").is_file()
    model = load_trained_model(out, load_run_config(out))
    assert type(model).__name__.startswith("PeftModel")


def test_resume_mid_round_is_exact(base_overrides, tmp_path):
    overrides = [
        *base_overrides,
        _method(clients=3, rounds_every=4),
        "train.max_steps=12",
        "train.save_every=6",
    ]
    full = run_train(load_config(None, overrides))
    root = tmp_path / "run" / "checkpoints"
    (root / "latest").write_text("step-00000006")  # mid-round, clients 0-2 each with their own moments
    (tmp_path / "run" / "summary.json").unlink()
    resumed = run_train(load_config(None, overrides), resume=True)
    assert resumed["train"]["resumed"]
    assert resumed["weights_sha256_per_rank"] == full["weights_sha256_per_rank"]
    assert resumed["method_reports"] == full["method_reports"]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [({"split_layer": 3}, "split_layer=3"), ({"clients": 4, "rounds_every": 2}, "rounds_every")],
)
def test_bad_split_settings_are_one_line(capsys, base_overrides, fields, expected):
    line = cli_err(capsys, "train", *base_overrides, _method(**fields))
    assert expected in line


def test_several_processes_are_refused(monkeypatch):
    from leantune.errors import UserError
    from leantune.methods.registry import MethodContext
    from leantune.methods.split_lora import SplitLoraConfig, apply

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="one process"):
        apply(None, SplitLoraConfig(), MethodContext(task="classification", seed=0))
