"""Training behaviour on tiny random-initialised models: it learns, and each method trains what it should."""

from __future__ import annotations

import json

import pytest
import torch

from leantune.config import load_config
from leantune.recipes.train import prepare, run_train


def _logged_losses(run_dir) -> list[float]:
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [ln["loss"] for ln in lines if "loss" in ln and ln.get("split") is None]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_classifier_learns_toy_task(base_overrides, tmp_path, method):
    # LoRA on a random-init base needs a higher rate and more steps than full fine-tuning to learn (on
    # real weights see test_real_model.py); seeded, so this is deterministic on CPU.
    lora = [
        "methods=[{name: lora, r: 16, dropout: 0.0, target_modules: all-linear}]",
        "train.lr=5e-3",
        "train.epochs=10",
    ]
    extra = lora if method == "lora" else ["methods=[full]"]
    summary = run_train(load_config(None, [*base_overrides, "train.log_every=5", *extra]))
    losses = _logged_losses(tmp_path / "run")
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    test = summary["test"]
    assert test["accuracy"] >= test["majority_accuracy"] + 0.2, test
    assert summary["params"]["trainable"] > 0
    if method == "lora":
        assert summary["params"]["trainable_pct"] < 50.0
    assert (tmp_path / "run" / "summary.json").is_file()


def _train_steps(overrides: list[str], steps: int = 6):
    """Build a run in process and train a few steps; return (model before, model after) states."""
    prep = prepare(load_config(None, [*overrides, f"train.max_steps={steps}", "train.save_every=1000"]))
    prep.out.mkdir(parents=True)
    before = {n: p.detach().cpu().clone() for n, p in prep.model.named_parameters()}
    trainer = prep.trainer()
    trainer.fit()
    after = {n: p.detach().cpu().clone() for n, p in trainer.module.named_parameters()}
    return prep, before, after


def test_lora_changes_only_lora_parameters(base_overrides):
    prep, before, after = _train_steps([*base_overrides, "methods=[{name: lora, r: 4}]"])
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "nothing trained"
    for name in before:
        trainable = dict(prep.model.named_parameters())[name].requires_grad
        if "lora_" in name or "modules_to_save" in name:
            assert trainable
        else:
            assert not trainable, name
            assert torch.equal(before[name], after[name]), f"frozen {name} moved"
    assert any("lora_B" in n for n in changed) and any("modules_to_save" in n for n in changed)


def test_freeze_keeps_lower_blocks_bit_identical(base_overrides):
    prep, before, after = _train_steps([*base_overrides, "methods=[{name: freeze, layers: 2}]"])
    frozen = [
        n
        for n in before
        if n.startswith(("bert.embeddings", "bert.encoder.layer.0.", "bert.encoder.layer.1."))
    ]
    assert frozen
    for name in frozen:
        assert torch.equal(before[name], after[name]), name
    moved = [
        n for n in before if n.startswith("bert.encoder.layer.2.") and not torch.equal(before[n], after[n])
    ]
    assert moved, "the unfrozen top block did not train"
    assert prep.params["trainable"] < prep.params["total"]


def test_full_trains_every_block(base_overrides):
    _, before, after = _train_steps([*base_overrides, "methods=[full]"])
    assert not torch.equal(
        before["bert.encoder.layer.0.attention.self.query.weight"],
        after["bert.encoder.layer.0.attention.self.query.weight"],
    )


@pytest.mark.parametrize("arch,task", [("gpt2", "causal_lm"), ("llama", "causal_lm"), ("t5", "seq2seq")])
def test_generative_tasks_reduce_loss(tiny_models, tmp_path, arch, task):
    rows = [
        {"text": f"question {i % 7}", "label": f"answer {i % 7} is {'yes' if i % 2 else 'no'}"}
        for i in range(96)
    ]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_train(
        load_config(
            None,
            [
                f"task={task}",
                f"model.name={tiny_models[arch]}",
                f"data.source={data}",
                "model.max_length=24",
                "train.batch_size=16",
                "train.lr=1e-2",
                "train.epochs=10",
                "train.log_every=5",
                "train.num_threads=1",
                "methods=[full]",
                "output.tensorboard=false",
                f"output.dir={tmp_path / 'run'}",
            ],
        )
    )
    losses = _logged_losses(tmp_path / "run")
    assert losses[-1] < 0.7 * losses[0], losses
    assert summary["test"]["perplexity"] < 0.5 * torch.exp(torch.tensor(losses[0])).item()


def test_local_paths_are_recorded_absolutely(tiny_models, sentiment_csv, tmp_path, monkeypatch):
    """A run started with relative paths can be evaluated/exported from any other folder later."""
    import os

    monkeypatch.chdir(tiny_models["bert"].parent)
    rel_model = os.path.relpath(tiny_models["bert"])
    rel_data = os.path.relpath(sentiment_csv)
    cfg = load_config(
        None,
        [
            f"model.name={rel_model}",
            f"data.source={rel_data}",
            "methods=[full]",
            "train.max_steps=1",
            f"output.dir={tmp_path / 'run'}",
            "output.tensorboard=false",
        ],
    )
    run_train(cfg)
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.model.name == str(tiny_models["bert"].resolve())
    assert saved.data.source == str(sentiment_csv.resolve())


def test_tensorboard_events_hold_the_logged_losses(base_overrides, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_train(
        load_config(None, [*base_overrides, "methods=[full]", "train.log_every=4", "output.tensorboard=true"])
    )
    events = EventAccumulator(str(tmp_path / "run" / "trackers" / "leantune"))
    events.Reload()
    tb_losses = [e.value for e in events.Scalars("train/loss")]
    assert tb_losses == pytest.approx(_logged_losses(tmp_path / "run"), rel=1e-6)
    assert "validation/accuracy" in events.Tags()["scalars"]


def test_lora_trains_the_head_of_t5_style_classifiers(tiny_models, sentiment_csv, tmp_path):
    """peft only knows `classifier`/`score` heads; T5's `classification_head` must train too."""
    prep, before, after = _train_steps(
        [
            f"model.name={tiny_models['t5']}",
            f"data.source={sentiment_csv}",
            "model.max_length=16",
            "train.batch_size=16",
            "output.tensorboard=false",
            f"output.dir={tmp_path / 'run'}",
        ],
        steps=2,
    )
    head = [n for n in before if "classification_head" in n and "modules_to_save" in n]
    assert head and all(not torch.equal(before[n], after[n]) for n in head if n.endswith("weight"))


def test_a_failed_start_can_be_started_again(base_overrides, tmp_path):
    """A run that died before its first checkpoint left its marker and config.yaml: the same command
    starts over, and only then; without the marker the folder is not leantune's and is refused."""
    from leantune.errors import UserError
    from leantune.runfolder import MARKER, RunFolder

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("task: classification\n")
    cfg = [*base_overrides, "methods=[full]", "train.max_steps=2"]
    with pytest.raises(UserError, match="did not write"):
        run_train(load_config(None, cfg))
    assert (run / "config.yaml").read_text() == "task: classification\n"
    RunFolder(run).write_marker("0" * 64, "0.0")
    summary = run_train(load_config(None, cfg))
    assert summary["train"]["steps"] == 2
    assert (run / MARKER).is_file()
