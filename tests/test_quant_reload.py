"""A quantised run is evaluated on the quantised base it trained on; LoRA-SP trains on a quantised base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from leantune.config import load_config
from leantune.data.tasks import collate
from leantune.methods.lora_sp import sparse_layers
from leantune.methods.quant import quantized_layers
from leantune.models.loader import load_model
from leantune.recipes.common import load_run_config, load_trained_model
from leantune.recipes.evaluate import run_eval
from leantune.recipes.train import prepare, run_train
from tests.conftest import cli_err

QUANT = "{name: quant, bits: 4, backend: torch}"
SP = "{name: lora_sp, r: 8, dropout: 0.0, target_modules: all-linear}"
LORA = "{name: lora, r: 8, dropout: 0.0, target_modules: all-linear}"


@pytest.fixture(scope="module")
def qlora_run(tiny_models, sentiment_csv, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("qlora") / "run"
    overrides = [
        f"model.name={tiny_models['bert']}",
        "model.max_length=16",
        f"data.source={sentiment_csv}",
        "train.batch_size=16",
        "train.lr=1e-2",
        "train.max_steps=40",
        "train.num_threads=1",
        "output.tensorboard=false",
        f"output.dir={out}",
        f"methods=[{QUANT}, {{name: lora, dropout: 0.0}}]",
    ]
    return out, run_train(load_config(None, overrides))


def test_eval_of_a_quantised_run_equals_its_own_final_test_loss(qlora_run, capsys):
    out, summary = qlora_run
    result = run_eval(out, None, "test")
    assert result["loss"] == pytest.approx(summary["test"]["loss"], abs=1e-5)
    assert result["accuracy"] == summary["test"]["accuracy"]
    assert quantized_layers(load_trained_model(out, load_run_config(out)))
    # what eval did before: the adapter on the full-precision base computes something else
    cfg = load_run_config(out)
    base = load_model(cfg.model.name, cfg.task, cfg.model.dtype, cfg.data.label_names)
    unquantised = PeftModel.from_pretrained(base, str(out / "model")).eval()
    quantised = load_trained_model(out, cfg).eval()
    from leantune.models.loader import load_tokenizer
    from leantune.recipes.train import build_features

    tok = load_tokenizer(str(out / "model"))
    batch = collate(list(build_features(cfg, tok)["test"][:32]), tok.pad_token_id)
    with torch.no_grad():  # (the tiny random model's logits hardly depend on its blocks: compare states)
        q, u = (m(**batch, output_hidden_states=True).hidden_states[-1] for m in (quantised, unquantised))
        same = load_trained_model(out, cfg).eval()(**batch, output_hidden_states=True).hidden_states[-1]
    assert (q - u).abs().max() > 1e-3
    assert torch.equal(q, same)  # quantising is deterministic: the same codes on every reload


def test_merging_a_quantised_run_is_a_one_line_refusal(qlora_run, capsys, tmp_path):
    out, _ = qlora_run
    line = cli_err(capsys, "export", out, "--merge", "--out", tmp_path / "merged")
    assert "quantised base" in line and "without --merge" in line
    assert not (tmp_path / "merged").exists()


def _prepare(base_overrides, out: Path, *methods: str):
    # a random-initialised encoder learns slowly under LoRA (see test_lora_sp): a high rate, 10 epochs
    extra = ["train.save_every=null", f"output.dir={out}", "train.lr=1e-2", "train.epochs=10"]
    cfg = load_config(None, [*base_overrides, f"methods=[{', '.join(methods)}]", *extra])
    prep = prepare(cfg)
    out.mkdir(parents=True)
    return prep


def _lora_entries(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)


def test_lora_sp_on_a_quantised_base_trains_half_of_loras_entries(base_overrides, tmp_path):
    torch.set_num_threads(1)
    lora = _prepare(base_overrides, tmp_path / "lora", QUANT, LORA)
    prep = _prepare(base_overrides, tmp_path / "sp", QUANT, SP)
    assert quantized_layers(prep.model) and 2 * _lora_entries(prep.model) == _lora_entries(lora.model) > 0
    layers = sparse_layers(prep.model)
    before = {n: m.weight.detach().clone() for n, m in layers.items()}
    batch = collate(list(prep.data["train"][:64]), prep.tokenizer.pad_token_id)

    def loss() -> float:
        prep.model.eval()
        with torch.no_grad():
            return float(prep.model(**batch).loss)

    start = loss()
    prep.trainer().fit()
    assert loss() < 0.8 * start
    assert layers
    for name, m in layers.items():
        after = m.weight.detach()
        trainable = torch.zeros(after.numel(), dtype=torch.bool)
        trainable[m.parametrizations.weight[0].index] = True
        trainable = trainable.view(after.shape)
        assert torch.equal(after[~trainable], before[name][~trainable]), name
        assert (after[trainable] != before[name][trainable]).float().mean() > 0.5, name
