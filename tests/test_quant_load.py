"""Quantised bases loaded through `BitsAndBytesConfig` (quant's `load_options`): the same layers and the
same codes as quantising after a full-precision load (so either path reloads the other's runs), a run
trained on a base quantised at load time evaluates to its own test numbers, the fallback says why, and
the 4-bit load peak is below the fp32 one."""

from __future__ import annotations

import pytest
import torch

from leantune.config import load_config
from leantune.methods.quant import QuantConfig, load_options, quantize, quantized_layers
from leantune.methods.registry import load_options as all_load_options
from leantune.models.loader import load_model
from leantune.recipes.evaluate import run_eval
from leantune.recipes.train import run_train
from tests.conftest import ci_only

TASK = {"bert": "classification", "gpt2": "causal_lm"}


def _loaded(path, arch: str, cfg: QuantConfig, at_load: bool):
    labels = ["neg", "pos"] if TASK[arch] == "classification" else None
    options = load_options(cfg, TASK[arch], "float32") if at_load else None
    torch.manual_seed(0)  # the new classification head starts the same in both
    return quantize(load_model(str(path), TASK[arch], "float32", labels, options=options), cfg).eval()


@pytest.mark.parametrize(("arch", "bits"), [("bert", 4), ("bert", 8), ("gpt2", 4)])
def test_load_time_quantisation_equals_quantising_after(tiny_models, arch, bits):
    cfg = QuantConfig(bits=bits)
    after = _loaded(tiny_models[arch], arch, cfg, at_load=False)
    during = _loaded(tiny_models[arch], arch, cfg, at_load=True)
    names = {n for n, m in during.named_modules() if m in quantized_layers(during)}
    assert names == {n for n, m in after.named_modules() if m in quantized_layers(after)}
    assert all(getattr(m, "leantune_at_load", False) for m in quantized_layers(during))
    assert not any(getattr(m, "leantune_at_load", False) for m in quantized_layers(after))
    assert not any(k in n for n in names for k in ("classifier", "pooler", "lm_head"))
    for (name, a), (_, b) in zip(after.state_dict().items(), during.state_dict().items(), strict=True):
        assert torch.equal(a, b), name  # codes, scales and full-precision weights alike
    ids = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(after(input_ids=ids).logits, during(input_ids=ids).logits)


def test_blocksize_other_than_64_falls_back_with_a_reason(capsys):
    assert load_options(QuantConfig(blocksize=128), "classification", "float32") is None
    assert "blocksize 128" in capsys.readouterr().out
    assert load_options(QuantConfig(backend="torch"), "classification", "float32") is None
    assert "backend torch" in capsys.readouterr().out
    options = all_load_options([QuantConfig(bits=8)], "classification", "float32")
    assert options["quantization_config"].load_in_8bit


def test_run_on_a_base_quantised_at_load_reloads_for_eval(base_overrides, tmp_path):
    summary = run_train(
        load_config(
            None,
            [
                *base_overrides,
                "train.max_steps=6",
                "methods=[{name: quant, bits: 4}, {name: lora, dropout: 0.0}]",
            ],
        )
    )
    report = summary["method_reports"]["quant"]
    assert report["quantized_at_load"] == report["quantized_layers"] > 0
    result = run_eval(tmp_path / "run", None, "test")
    assert result["loss"] == pytest.approx(summary["test"]["loss"], abs=1e-6)


@pytest.mark.slow
@ci_only  # ~25 s: two model loads in fresh processes
def test_4bit_load_peak_is_below_the_fp32_load_peak(tmp_path):
    """A BERT-shaped model (8 blocks of width 768, small vocabulary: 57M weights in linear layers) saved
    in bf16, loaded in fresh processes: through BitsAndBytesConfig the process's peak RSS grows by less
    than when it loads in fp32 (which converts every weight), and less than quantising after that load."""
    from transformers import BertConfig, BertForSequenceClassification

    from leantune.bench.load_peak import run_one

    config = BertConfig(vocab_size=1000, hidden_size=768, num_hidden_layers=8, intermediate_size=3072)
    torch.manual_seed(0)
    BertForSequenceClassification(config).to(torch.bfloat16).save_pretrained(str(tmp_path / "m"))
    rows = {
        s: run_one("tmp", "classification", s, str(tmp_path / "m"))
        for s in ("fp32", "swap_4bit", "load_4bit")
    }
    peak = {s: r["load_peak_bytes"] / 2**20 for s, r in rows.items()}
    print(f"load peak MiB: {peak}")
    assert peak["load_4bit"] < 0.75 * peak["fp32"]
    assert peak["load_4bit"] < 0.75 * peak["swap_4bit"]
