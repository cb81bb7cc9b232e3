"""Saved models travel: adapters name a base peft can resolve, carry a model card, and every checkpoint of a
peft run holds a loadable adapter that `leantune export --checkpoint` writes out."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from leantune.config import load_config
from leantune.models.embedded import HUB_IDS, portable_name
from leantune.recipes.common import load_run_config, load_trained_model
from leantune.recipes.export import run_export
from leantune.recipes.train import run_train
from tests.conftest import cli_err


@pytest.fixture(scope="module")
def lora_run(tiny_models, sentiment_csv, tmp_path_factory):
    """4 steps with a checkpoint every 2; the only evaluation is the last, so step 4 is the final model."""
    run = tmp_path_factory.mktemp("portable") / "run"
    overrides = [
        f"model.name={tiny_models['bert']}",
        "model.max_length=16",
        f"data.source={sentiment_csv}",
        "train.batch_size=16",
        "train.max_steps=4",
        "train.save_every=2",
        "train.num_threads=1",
        "output.tensorboard=false",
        f"output.dir={run}",
    ]
    summary = run_train(load_config(None, overrides))
    return run, summary, overrides


def test_embedded_models_are_named_by_their_hub_ids():
    assert portable_name("embedded:minilm") == HUB_IDS["minilm"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert portable_name("/data/models/mine") == "/data/models/mine"


def test_the_adapter_names_the_configured_base_and_carries_a_model_card(lora_run, tiny_models):
    run, summary, _ = lora_run
    adapter = json.loads((run / "model" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_models["bert"])
    card = (run / "model" / "README.md").read_text()
    assert f"base_model: {tiny_models['bert']}" in card and "library_name: peft" in card
    assert f"| test accuracy | {summary['test']['accuracy']:.4f} |" in card
    assert f"{summary['params']['trainable']:,} of" in card and "`lora` (r=8" in card


def test_a_copied_adapter_loads_with_plain_peft_and_gives_the_same_logits(lora_run, tiny_models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run, _, _ = lora_run
    copied = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(run / "model", copied)
    cfg = load_run_config(run)
    ours = load_trained_model(run, cfg).eval()
    base = AutoModelForSequenceClassification.from_pretrained(
        json.loads((copied / "adapter_config.json").read_text())["base_model_name_or_path"],
        num_labels=len(cfg.data.label_names),
    )
    theirs = PeftModel.from_pretrained(base, str(copied)).eval()
    batch = AutoTokenizer.from_pretrained(str(copied))(
        ["a great film", "dull and tedious"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        assert torch.allclose(ours(**batch).logits, theirs(**batch).logits, atol=1e-6)


def test_every_checkpoint_holds_an_adapter_and_export_checkpoint_writes_it(lora_run, tmp_path):
    run, _, _ = lora_run
    for step in ("step-00000002", "step-00000004"):
        assert (run / "checkpoints" / step / "model" / "adapter_config.json").is_file(), step
    out = run_export(run, merge=False, out=tmp_path / "ckpt4", checkpoint="4")
    final = load_file(str(run / "model" / "adapter_model.safetensors"))
    exported = load_file(str(out / "adapter_model.safetensors"))
    assert exported.keys() == final.keys()
    assert all(torch.equal(exported[k], final[k]) for k in final)
    early = load_file(
        str(run_export(run, False, tmp_path / "ckpt2", "step-00000002") / "adapter_model.safetensors")
    )
    assert any(not torch.equal(early[k], final[k]) for k in final)  # step 2 is another model


def test_export_checkpoint_of_a_full_run_loads_the_checkpoint_weights(base_overrides, tmp_path):
    from transformers import AutoModelForSequenceClassification

    run_train(
        load_config(None, [*base_overrides, "methods=[full]", "train.max_steps=2", "train.save_every=1"])
    )
    run = tmp_path / "run"
    assert not (
        run / "checkpoints" / "step-00000001" / "model"
    ).exists()  # the weights are trainable.safetensors
    out = run_export(run, merge=False, out=tmp_path / "step1", checkpoint="1")
    saved = load_file(str(run / "checkpoints" / "step-00000001" / "trainable.safetensors"))
    model = AutoModelForSequenceClassification.from_pretrained(str(out))
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in saved.items())


def test_export_of_a_missing_checkpoint_names_the_ones_there_are(lora_run, capsys):
    run, _, _ = lora_run
    line = cli_err(capsys, "export", run, "--checkpoint", "99")
    assert "no checkpoint '99'" in line and "step-00000002, step-00000004" in line


def test_benchmark_artefacts_hold_no_path_of_the_machine_that_ran_them(tmp_path):
    import sys

    from leantune.bench.artefact import portable

    root, run = tmp_path / "repo", tmp_path / "scratch" / "lora-r1"
    raw = {
        "command": [sys.executable, "-m", "leantune", "train", f"output.dir={run}"],
        "config": {"data": {"source": f"{root}/benchmarks/data/trec.csv"}, "output": {"dir": str(run)}},
        "steps": 3,
    }
    assert portable(raw, run, root) == {
        "command": ["python", "-m", "leantune", "train", "output.dir=<run>"],
        "config": {"data": {"source": "benchmarks/data/trec.csv"}, "output": {"dir": "<run>"}},
        "steps": 3,
    }
