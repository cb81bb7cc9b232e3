"""LoRA-SP: masked entries never move, half of LoRA's trainables and optimizer state, a plain-LoRA export.

All on the tiny random BERT: the exact properties (bit-identical masked entries, exact counts and bytes,
equal logits) do not depend on the model's size; quality on a real model lives in the benchmark suite
benchmarks/suites/seed001-table1.yaml.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from leantune.config import dump_config, load_config
from leantune.methods.lora_sp import mask_index, masks, sparse_layers
from leantune.recipes.train import _save_model, prepare, run_train
from tests.conftest import cli_err

SP = "{name: lora_sp, r: 8, dropout: 0.0, target_modules: all-linear}"
LORA = "{name: lora, r: 8, dropout: 0.0, target_modules: all-linear}"
TEXTS = ["the film was superb and moving", "dull and tedious plot", "it was quite bland"]


def _prepare(base_overrides, out: Path, method: str, *extra: str):
    cfg = load_config(
        None, [*base_overrides, f"methods=[{method}]", "train.save_every=null", f"output.dir={out}", *extra]
    )
    prep = prepare(cfg)
    out.mkdir(parents=True)
    return prep


def _fit(prep):
    trainer = prep.trainer()
    trainer.fit()
    return trainer


def _logits(model, tok, texts=TEXTS) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**tok(texts, return_tensors="pt", padding=True)).logits


def _lora_state_bytes(trainer) -> tuple[int, int]:
    """(trainable LoRA entries, bytes of AdamW state for them); the task head is the same in both runs."""
    names = {id(p): n for n, p in trainer.module.named_parameters()}
    params = [p for p in trainer.module.parameters() if p.requires_grad and "lora_" in names[id(p)]]
    state = trainer.optimizer.state_dict()["state"]
    ids = {id(p): i for i, p in enumerate(p for g in trainer.optimizer.param_groups for p in g["params"])}
    state_bytes = sum(
        t.numel() * t.element_size()
        for p in params
        for t in state[ids[id(p)]].values()
        if torch.is_tensor(t) and t.ndim > 0
    )
    return sum(p.numel() for p in params), state_bytes


def _flat_mask(m) -> torch.Tensor:
    """True at the trainable entries of a re-parametrised matrix, in its shape."""
    trainable = torch.zeros(m.weight.numel(), dtype=torch.bool)
    trainable[m.parametrizations.weight[0].index] = True
    return trainable.view(m.weight.shape)


def _peft_init(base_overrides, out: Path) -> dict[str, torch.Tensor]:
    """A plain LoRA built with the same seed: peft's init of every A and B, keyed like sparse_layers."""
    prep = _prepare(base_overrides, out, LORA)
    return {
        n: m.weight.detach().clone()
        for n, m in prep.model.named_modules()
        if ".lora_" in n and hasattr(m, "weight")
    }


@pytest.mark.parametrize("frozen", ["zero", "init"])
def test_masked_entries_are_bit_identical_after_training(base_overrides, tmp_path, frozen):
    # weight decay would move masked entries if they were parameters with a masked gradient
    method = SP.replace("}", f", frozen_entries: {frozen}}}")
    prep = _prepare(base_overrides, tmp_path / "sp", method, "train.max_steps=12", "train.weight_decay=0.1")
    init = _peft_init(base_overrides, tmp_path / "lora")
    layers = sparse_layers(prep.model)
    before = {n: m.weight.detach().clone() for n, m in layers.items()}
    trainer = _fit(prep)
    assert trainer.state.step == 12
    assert len(layers) == 2 * 19  # A and B of 18 block linears + the pooler
    for name, m in layers.items():
        after, trainable = m.weight.detach(), _flat_mask(m)
        assert torch.equal(after[~trainable], before[name][~trainable]), name
        # the trainable entries start at peft's init in both settings
        assert torch.equal(before[name][trainable], init[name][trainable]), name
        if name.split(".")[-2] == "lora_B" or frozen == "zero":
            assert not after[~trainable].any(), name  # zero: the paper's masks; B: peft starts it at 0
        else:
            assert torch.equal(after[~trainable], init[name][~trainable]), name  # init: peft's values
            assert (after[~trainable] != 0).float().mean() > 0.9, name
        if name.split(".")[-2] == "lora_B":
            assert (after[trainable] != 0).float().mean() > 0.9, name
        else:
            assert (after[trainable] != before[name][trainable]).float().mean() > 0.9, name


@pytest.mark.parametrize("frozen", ["zero", "init"])
def test_delta_weight_is_the_masked_product(base_overrides, tmp_path, frozen):
    """Seed 001 eq. 2, dW = (A*S)(B*S)^T, read off peft's own delta weight of every adapted layer."""
    from peft.tuners.lora import LoraLayer

    method = SP.replace("}", f", frozen_entries: {frozen}}}")
    prep = _prepare(base_overrides, tmp_path / "sp", method, "train.max_steps=4")
    init = _peft_init(base_overrides, tmp_path / "lora")
    _fit(prep)
    layers = [(n, m) for n, m in prep.model.named_modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 19
    for name, layer in layers:
        a, b = layer.lora_A["default"], layer.lora_B["default"]
        a_s, b_s = (m.weight.detach() * _flat_mask(m) for m in (a, b))  # A*S and B*S
        masked = (b_s @ a_s) * layer.scaling["default"]
        delta = layer.get_delta_weight("default").detach()
        a_frozen = init[f"{name}.lora_A.default"] * ~_flat_mask(a)
        rest = (b_s @ a_frozen) * layer.scaling["default"]  # what a frozen A part adds
        assert rest.abs().max() > 1e-4, name  # trained B makes the frozen part of A matter
        want = masked if frozen == "zero" else masked + rest
        assert torch.allclose(delta, want, atol=1e-6, rtol=1e-5), name
        assert (delta - masked).abs().max() > 1e-4 if frozen == "init" else True, name


def test_half_of_loras_trainables_and_optimizer_state(base_overrides, tmp_path):
    runs = {}
    for label, method in (("lora", LORA), ("sp", SP)):
        runs[label] = _fit(_prepare(base_overrides, tmp_path / label, method, "train.max_steps=2"))
    lora_count, lora_bytes = _lora_state_bytes(runs["lora"])
    sp_count, sp_bytes = _lora_state_bytes(runs["sp"])
    assert lora_count == 2 * 19 * 8 * 32 + 2 * 3 * 8 * (64 - 32)  # every linear's A and B at r=8
    assert 2 * sp_count == lora_count
    assert lora_bytes == 2 * 4 * lora_count  # AdamW: exp_avg + exp_avg_sq, fp32
    assert 2 * sp_bytes == lora_bytes
    heads = [
        sum(p.numel() for n, p in r.module.named_parameters() if "classifier" in n and p.requires_grad)
        for r in runs.values()
    ]
    assert heads[0] == heads[1] > 0
    assert sum(p.numel() for p in runs["sp"].params) == sp_count + heads[1]


def test_mask_is_seeded_reproducible_and_exact(base_overrides, tmp_path):
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
    assert torch.equal(mask_index(3, key, 257, 0.5), mask_index(3, key, 257, 0.5))
    assert not torch.equal(mask_index(3, key, 256, 0.5), mask_index(4, key, 256, 0.5))
    assert not torch.equal(mask_index(3, key, 256, 0.5), mask_index(3, key.replace("_A", "_B"), 256, 0.5))
    assert mask_index(3, key, 257, 0.5).numel() == 128
    assert mask_index(3, key, 256, 0.3).numel() == math.floor(0.3 * 256)
    idx = mask_index(3, key, 256, 0.5)
    assert idx.unique().numel() == 128 and int(idx.min()) >= 0 and int(idx.max()) < 256
    # null mask_seed means train.seed; every matrix carries the mask its key and seed give
    for seed, method, train_seed in ((7, SP.replace("}", ", mask_seed: 7}"), 0), (5, SP, 5)):
        prep = _prepare(base_overrides, tmp_path / f"s{seed}", method, f"train.seed={train_seed}")
        for entries in masks(prep.model):
            assert entries.mask_seed == seed
            assert torch.equal(entries.index, mask_index(seed, entries.key, entries.numel, 0.5)), entries.key


@pytest.fixture(scope="module")
def sp_run(tiny_models, sentiment_csv, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sp") / "run"
    overrides = [
        f"model.name={tiny_models['bert']}",
        "model.max_length=16",
        f"data.source={sentiment_csv}",
        f"methods=[{SP}]",
        "train.batch_size=16",
        "train.lr=2e-2",  # a random-initialised encoder learns slowly under LoRA (see test_export_eval)
        "train.epochs=10",
        "train.num_threads=1",
        "train.save_every=null",
        "output.tensorboard=false",
        f"output.dir={out}",
    ]
    return out, run_train(load_config(None, overrides))


def test_loss_goes_down_and_the_report_counts_entries(sp_run):
    run_dir, summary = sp_run
    losses = [
        r["loss"]
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if "split" not in r
    ]
    assert losses[0] > 0.68 and losses[-1] < 0.6 * losses[0], losses
    assert summary["test"]["accuracy"] > summary["test"]["majority_accuracy"] + 0.1
    report = summary["method_reports"]["lora_sp"]
    assert report["mask_seed"] == 0 and report["density"] == 0.5 and report["achieved_density"] == 0.5
    assert report["matrices"] == 38 and 2 * report["trainable_entries"] == report["dense_entries"]
    assert summary["params"]["trainable"] == report["trainable_entries"] + 66  # + the 2-class head on 32


def test_saved_adapter_is_plain_lora_that_peft_loads(sp_run):
    from peft import PeftModel
    from safetensors.torch import load_file

    from leantune.models.loader import load_model, load_tokenizer
    from leantune.recipes.common import load_run_config, load_trained_model
    from leantune.train.checkpoint import load_trainable_state

    run_dir, _ = sp_run
    folder = run_dir / "model"
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert not [k for k in saved if "parametrizations" in k or k.endswith(("values", "index"))]
    sidecar = json.loads((folder / "lora_sp.json").read_text())
    assert sidecar["mask_seed"] == 0 and sidecar["density"] == 0.5
    lora_keys = [k for k in saved if "lora_" in k]
    assert sorted(lora_keys) == sorted(sidecar["entries"]) and len(lora_keys) == 38
    cfg = load_run_config(run_dir)
    tok = load_tokenizer(str(folder))
    # the trained model itself: the run rebuilt (same seed, so the same init) with the best weights it
    # restored before saving
    prep = prepare(
        cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": str(run_dir / "x")})})
    )
    init = {
        m.parametrizations.weight[0].key: m.weight.detach().clone()
        for m in sparse_layers(prep.model).values()
    }
    for key in lora_keys:  # the sidecar's seed reproduces the mask: outside it A is its init, B is zero
        frozen = torch.ones(saved[key].numel(), dtype=torch.bool)
        frozen[mask_index(sidecar["mask_seed"], key, saved[key].numel(), sidecar["density"])] = False
        assert torch.equal(saved[key].reshape(-1)[frozen], init[key].reshape(-1)[frozen]), key
        assert not torch.equal(saved[key].reshape(-1)[~frozen], init[key].reshape(-1)[~frozen]), key
        if "lora_B" in key:
            assert not saved[key].reshape(-1)[frozen].any(), key

    load_trainable_state(prep.model, load_file(str(run_dir / "best.safetensors")))
    want = _logits(prep.model, tok)
    adapter = PeftModel.from_pretrained(
        load_model(cfg.model.name, cfg.task, "float32", cfg.data.label_names), str(folder)
    )
    assert (_logits(adapter, tok) - want).abs().max().item() <= 1e-5
    assert (_logits(load_trained_model(run_dir, cfg), tok) - want).abs().max().item() <= 1e-5
    untrained = load_model(cfg.model.name, cfg.task, "float32", cfg.data.label_names)
    assert (_logits(untrained, tok) - want).abs().max().item() > 1e-2  # the adapter changed the model

    # saving twice from the live model writes the same tensors (densifying leaves the model sparse)
    _save_model(prep.model, tok, run_dir / "again")
    again = load_file(str(run_dir / "again" / "adapter_model.safetensors"))
    assert all(torch.equal(again[k], saved[k]) for k in saved)
    assert sparse_layers(prep.model)


def test_merged_export_and_eval_match_the_adapter(capsys, sp_run):
    from transformers import AutoModelForSequenceClassification

    from leantune.cli import main
    from leantune.models.loader import load_tokenizer
    from leantune.recipes.common import load_run_config, load_trained_model

    run_dir, summary = sp_run
    assert main(["export", str(run_dir), "--merge", "--out", str(run_dir / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(str(run_dir / "merged"))
    tok = load_tokenizer(str(run_dir / "model"))
    adapter = load_trained_model(run_dir, load_run_config(run_dir))
    assert (_logits(merged, tok) - _logits(adapter, tok)).abs().max().item() <= 1e-5
    assert main(["eval", str(run_dir), "--out", str(run_dir / "eval.json")]) == 0
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["accuracy"] == summary["test"]["accuracy"]
    assert abs(result["loss"] - summary["test"]["loss"]) <= 1e-5


def _cut_run(base_overrides, tmp_path, frozen: str) -> tuple[Path, dict]:
    """A 17-step run (checkpoints every 5) and a copy cut back to its step-10 checkpoint, as if killed."""
    method = SP.replace("0.0", "0.2").replace("}", f", frozen_entries: {frozen}}}")
    extra = [f"methods=[{method}]", "train.epochs=1", "train.save_every=5", "train.keep_checkpoints=5"]
    ref = tmp_path / "ref"
    want = run_train(load_config(None, [*base_overrides, *extra, f"output.dir={ref}"]))
    cut = tmp_path / "cut"
    shutil.copytree(ref, cut)
    for leftover in ("model", "summary.json", "best.safetensors", "checkpoints/step-00000015"):
        path = cut / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (cut / "checkpoints" / "latest").write_text("step-00000010")
    cfg = load_config(cut / "config.yaml")
    cfg.output.dir = str(cut)
    (cut / "config.yaml").write_text(dump_config(cfg))
    return cut, want


@pytest.mark.parametrize("frozen", ["zero", "init"])
def test_resume_is_exact(base_overrides, tmp_path, frozen):
    # one epoch of 17 steps, checkpoints every 5, no evaluation before step 10: the run killed after its
    # step-10 checkpoint is the reference folder cut back to that checkpoint
    cut, want = _cut_run(base_overrides, tmp_path, frozen)
    got = run_train(load_config(cut / "config.yaml"), resume=True)
    assert got["train"]["resumed"] and got["train"]["steps"] == want["train"]["steps"] == 17
    assert got["weights_sha256_per_rank"] == want["weights_sha256_per_rank"]
    assert got["test"] == want["test"]
    assert got["method_reports"]["lora_sp"]["frozen_entries"] == frozen


def test_an_init_checkpoint_is_not_resumed_as_zero(capsys, base_overrides, tmp_path):
    """A run from before the option (its masked A entries at init) would resume under the new default,
    zero, and silently train another product: refused in one line, the run folder untouched; with
    --force-resume too, its checkpoints untouched."""
    from tests.bad_input.harness import tree_hash

    cut, _ = _cut_run(base_overrides, tmp_path, "init")
    text = (cut / "config.yaml").read_text()
    assert "frozen_entries: init" in text
    (cut / "config.yaml").write_text(text.replace("  frozen_entries: init\n", ""))  # as written before
    before = tree_hash(cut)
    capsys.readouterr()  # the reference run's progress bars
    line = cli_err(capsys, "train", cut / "config.yaml", "--resume")
    assert "methods.0.frozen_entries: init -> zero" in line  # the config identity check names it
    assert tree_hash(cut) == before
    from leantune.cli import main

    checkpoints = tree_hash(cut / "checkpoints")
    assert main(["train", str(cut / "config.yaml"), "--resume", "--force-resume"]) == 2
    warning, line = capsys.readouterr().err.strip().splitlines()  # forcing warns, the weights refuse
    assert "warning: resuming" in warning and "Traceback" not in line
    assert "frozen_entries=init" in line and "not zero" in line
    assert tree_hash(cut / "checkpoints") == checkpoints  # (--force-resume rewrites config.yaml first)


def test_bad_density_is_one_line(capsys, base_overrides):
    line = cli_err(capsys, "train", *base_overrides, "methods=[{name: lora_sp, density: 0}]")
    assert "density" in line
    line = cli_err(capsys, "train", *base_overrides, "methods=[{name: lora_sp, r: 1, density: 0.01}]")
    assert "lora_sp" in line and "density" in line and "no trainable entry" in line
