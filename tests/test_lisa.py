"""LISA: exactly gamma blocks train per step, re-sampled on schedule from (seed, period), inactive blocks
untouched (no update, no weight decay, no optimizer state), exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from leantune.config import load_config
from leantune.methods.lisa import sample_blocks
from leantune.methods.registry import MethodRuntime
from leantune.models.structure import embedding_modules, find_blocks
from leantune.recipes.train import prepare, run_train
from tests.conftest import cli_err


class Probe(MethodRuntime):
    """Runs after LISA's hooks: records which blocks may train and which hold AdamW state, per step."""

    def __init__(self) -> None:
        self.trained: list[set[int]] = []  # blocks with requires_grad during the step
        self.partial: list[int] = []  # blocks with a mix of trainable and frozen parameters
        self.rest_frozen: list[int] = []  # parameters outside the blocks that were frozen
        self.with_state: list[set[int]] = []  # blocks holding AdamW state after the step

    def on_step_start(self, trainer) -> None:
        _, blocks = find_blocks(trainer.module)
        flags = [[p.requires_grad for p in b.parameters()] for b in blocks]
        self.trained.append({i for i, f in enumerate(flags) if all(f)})
        self.partial.append(sum(any(f) and not all(f) for f in flags))
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        rest = [p for p in trainer.module.parameters() if id(p) not in in_blocks]
        self.rest_frozen.append(sum(not p.requires_grad for p in rest))

    def on_step_end(self, trainer) -> None:
        state = trainer.optimizer.optimizer.state
        _, blocks = find_blocks(trainer.module)
        self.with_state.append({i for i, b in enumerate(blocks) if any(p in state for p in b.parameters())})


def _fit_with_probe(overrides: list[str]):
    prep = prepare(load_config(None, overrides))
    prep.out.mkdir(parents=True, exist_ok=True)
    initial = {n: p.detach().clone() for n, p in prep.model.named_parameters()}
    trainer = prep.trainer()
    probe = Probe()
    trainer.runtimes.append(probe)
    trainer.fit()
    return trainer, probe, initial


def test_sampling_depends_only_on_seed_and_period():
    a = [sample_blocks(0, p, 6, 2) for p in range(10)]
    assert a == [sample_blocks(0, p, 6, 2) for p in range(10)]
    assert a != [sample_blocks(1, p, 6, 2) for p in range(10)]
    assert all(len(set(s)) == 2 and all(0 <= i < 6 for i in s) for s in a)
    assert len(set(a)) > 1  # periods really differ


def test_exactly_gamma_blocks_train_and_resample_on_schedule(base_overrides):
    k, steps, seed = 3, 12, 0
    trainer, probe, initial = _fit_with_probe(
        [
            *base_overrides,
            "methods=[{name: lisa, gamma: 1, interval: 3}]",
            f"train.max_steps={steps}",
            f"train.seed={seed}",
            "train.weight_decay=0.1",  # decay would move an inactive block if AdamW did not skip it
        ]
    )
    assert len(probe.trained) == steps
    assert all(len(t) == 1 for t in probe.trained) and probe.partial == [0] * steps
    assert probe.rest_frozen == [0] * steps  # embeddings and head always train
    # the active block changes only at multiples of K, and follows the (seed, period) draw
    assert all(probe.trained[s] == probe.trained[s - 1] for s in range(1, steps) if s % k)
    assert [set(sample_blocks(seed, s // k, 3, 1)) for s in range(steps)] == probe.trained
    assert any(probe.trained[s] != probe.trained[s - 1] for s in range(k, steps, k))
    # AdamW state exists for exactly the active block: released when a block goes inactive
    assert probe.with_state == probe.trained
    # between steps every parameter counts as trainable again, so checkpoints hold every trained tensor
    assert all(p.requires_grad for p in trainer.module.parameters())

    ever = set().union(*probe.trained)
    prefix, blocks = find_blocks(trainer.module)
    never = set(range(len(blocks))) - ever
    assert never, "pick a seed/schedule that leaves a block unsampled"
    for name, p in trainer.module.named_parameters():
        block = int(name[len(prefix) + 1 :].split(".")[0]) if name.startswith(prefix + ".") else None
        if block in never:
            assert torch.equal(p, initial[name]), name  # bit-identical, weight decay included
        elif block is not None and name.endswith("dense.weight"):
            assert not torch.equal(p, initial[name]), name
    emb_name = next(
        n for n, m in embedding_modules(trainer.module) if m is trainer.module.get_input_embeddings()
    )
    assert not torch.equal(trainer.module.get_input_embeddings().weight, initial[f"{emb_name}.weight"])

    report = trainer.runtimes[0].report()
    assert report["history"] == [[p * k, list(sample_blocks(seed, p, 3, 1))] for p in range(steps // k)]
    total = sum(p.numel() for p in trainer.module.parameters())
    assert (
        report["always_trained_params"] + sum(p.numel() for i in never for p in blocks[i].parameters())
        < total
    )
    assert 0 < report["trainable_active_pct"] < 100


def test_loss_goes_down_and_reports_active_share(base_overrides):
    lisa = ["methods=[{name: lisa, gamma: 1, interval: 5}]", "train.epochs=5", "train.log_every=5"]
    summary = run_train(load_config(None, [*base_overrides, *lisa]))
    lines = Path(summary["run_dir"], "metrics.jsonl").read_text().splitlines()
    losses = [r["loss"] for r in map(json.loads, lines) if "loss" in r and r.get("split") is None]
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    assert summary["test"]["accuracy"] >= summary["test"]["majority_accuracy"] + 0.2, summary["test"]
    assert summary["params"]["trainable_pct"] == 100.0  # every weight may train over the run ...
    report = summary["method_reports"]["lisa"]
    assert report["steps"] == summary["train"]["steps"]
    assert report["trainable_active_pct"] < 100.0  # ... but only embeddings, head and one block at a time

    from leantune.bench.artefact import params_with_active_share

    params = params_with_active_share(summary)
    assert params["trainable_active_pct"] == report["trainable_active_pct"]


def test_resume_gives_the_same_sampling_and_weights(base_overrides, tmp_path):
    overrides = [
        *base_overrides,
        "methods=[{name: lisa, gamma: 1, interval: 3}]",
        "train.max_steps=12",
        "train.save_every=4",
    ]
    full = run_train(load_config(None, overrides))
    root = tmp_path / "run" / "checkpoints"
    (root / "latest").write_text("step-00000008")  # as if killed after step 8 (mid-period: 8 % 3 != 0)
    (tmp_path / "run" / "summary.json").unlink()
    resumed = run_train(load_config(None, overrides), resume=True)
    assert resumed["train"]["resumed"]
    assert resumed["method_reports"]["lisa"]["history"] == full["method_reports"]["lisa"]["history"]
    assert resumed["weights_sha256_per_rank"] == full["weights_sha256_per_rank"]


def test_gamma_above_block_count_is_one_line(capsys, base_overrides):
    line = cli_err(capsys, "train", *base_overrides, "methods=[{name: lisa, gamma: 5}]")
    assert "gamma=5" in line and "3 blocks" in line


def test_several_processes_are_refused(monkeypatch):
    from leantune.errors import UserError
    from leantune.methods.lisa import LisaConfig, apply
    from leantune.methods.registry import MethodContext

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="single process"):
        apply(None, LisaConfig(), MethodContext(task="classification", seed=0))


def test_report_table_shows_the_active_share():
    from leantune.bench.report import Table
    from tests.test_bench import _fake

    lisa = _fake("lisa", 1, 8.0, 12.0, 0.8, methods=("lisa",))
    lisa["params"] = {"trainable_pct": 100.0, "trainable_active_pct": 12.5}
    header, rows = Table([_fake("full", 1, 10.0, 10.0, 0.8, methods=("full",)), lisa]).rows()
    by = {r[0]: dict(zip(header, r, strict=True)) for r in rows}
    assert by["lisa"]["trainable %"] == "12.500" and by["full"]["trainable %"] == "100.000"


@pytest.mark.parametrize(
    ("arch", "task", "blocks"), [("gpt2", "causal_lm", 3), ("llama", "causal_lm", 3), ("t5", "seq2seq", 4)]
)
def test_groups_partition_every_architecture(tiny_models, arch, task, blocks):
    """Blocks (both stacks of an encoder-decoder) and the always-trained rest cover every parameter once."""
    from leantune.methods.lisa import LayerGroups, LisaConfig
    from leantune.models.loader import load_model

    model = load_model(str(tiny_models[arch]), task)
    groups = LayerGroups(model, LisaConfig())
    ids = [id(p) for params in groups.blocks for p in params] + [id(p) for p in groups.always]
    assert len(groups.blocks) == blocks and not groups.never
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    words = model.get_input_embeddings().weight
    assert any(p is words for p in groups.always)
    no_emb = LayerGroups(model, LisaConfig(train_embeddings=False))
    assert any(p is words for p in no_emb.never)
