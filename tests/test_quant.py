"""Method `quant`: block-wise codes round-trip within a bound and match bitsandbytes bit for bit, a frozen
quantised base carries a LoRA that learns, the base never moves, parameter counts stay in weights, and
the saved adapter loads (and merges) onto the unquantised base."""

from __future__ import annotations

import json

import pytest
import torch

from leantune.config import load_config
from leantune.methods import MethodContext, apply_methods, get_method
from leantune.methods.quant import quantized_layers
from leantune.models.loader import load_model
from leantune.models.quantized import (
    CODEBOOKS,
    BlockwiseQuantLinear,
    dequantize_blockwise,
    quantize_blockwise,
)
from leantune.recipes.common import count_params
from tests.conftest import cli_err

bnb = pytest.importorskip("bitsandbytes")

TASKS = {"bert": "classification", "llama": "causal_lm"}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared CPU: more threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(tiny_models, arch: str, methods: str):
    torch.manual_seed(0)
    task = TASKS[arch]
    model = load_model(str(tiny_models[arch]), task, "float32", ["neg", "pos"] if arch == "bert" else None)
    cfg = load_config(None, [f"methods={methods}"])
    return apply_methods(model, cfg.methods, MethodContext(task=task, seed=0))


def _batch(arch: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if arch == "bert":  # a learnable signal: the label decides the first token
        ids = torch.randint(1000, 1100, (8, 12), generator=gen)
        labels = torch.arange(8) % 2
        ids[:, 0] = 1000 + labels
    else:  # a learnable sequence: every token is followed by the next id
        ids = 1000 + torch.arange(8)[:, None] + torch.arange(12)[None, :]
        labels = ids
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _frozen_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("quant_type,bound", [("nf4", 0.11), ("fp4", 0.15)])
def test_torch_4bit_round_trip_is_bounded_and_equals_bitsandbytes(quant_type, bound):
    weight = torch.randn(96, 200, generator=torch.Generator().manual_seed(0)) * 0.05
    codebook = torch.tensor(CODEBOOKS[quant_type])
    codes, absmax = quantize_blockwise(weight, 4, 64, codebook)
    assert codes.dtype == torch.uint8 and codes.numel() == weight.numel() // 2  # two codes per byte
    restored = dequantize_blockwise(codes, absmax, weight.shape, 4, 64, codebook)
    rel_rms = ((restored - weight).pow(2).mean().sqrt() / weight.std()).item()
    assert 0.01 < rel_rms < bound
    packed, state = bnb.functional.quantize_4bit(
        weight, blocksize=64, quant_type=quant_type, compress_statistics=False
    )
    assert torch.equal(restored, bnb.functional.dequantize_4bit(packed, state))


def test_torch_int8_round_trip_and_layer_gradients():
    linear = torch.nn.Linear(200, 96)
    codes, absmax = quantize_blockwise(linear.weight, 8, 64, None)
    restored = dequantize_blockwise(codes, absmax, linear.weight.shape, 8, 64, None)
    assert ((restored - linear.weight).abs().max() / linear.weight.abs().max()).item() < 1 / 127
    layer = BlockwiseQuantLinear(linear, 4, "nf4", 64)
    x = torch.randn(5, 200, requires_grad=True)
    layer(x).pow(2).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    w = layer.dequantized_weight()
    torch.nn.functional.linear(x_ref, w, linear.bias).pow(2).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    assert layer.weight.grad is None and not layer.weight.requires_grad


@pytest.mark.parametrize(
    "arch,backend,bits", [("bert", "bitsandbytes", 4), ("llama", "torch", 4), ("llama", "bitsandbytes", 8)]
)
def test_quantized_base_with_lora_learns_and_base_never_changes(tiny_models, arch, backend, bits):
    # The tiny random Llama's logits barely move through LoRA alone: its (never quantised) LM head trains too.
    head = ", modules_to_save: [lm_head]" if arch == "llama" else ""
    methods = f"[{{name: quant, backend: {backend}, bits: {bits}}}, {{name: lora, r: 8, dropout: 0.0{head}}}]"
    model = _model(tiny_models, arch, methods)
    expected = {"bitsandbytes": (bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt)}
    layers = quantized_layers(model)
    assert layers and all(isinstance(m, expected.get(backend, BlockwiseQuantLinear)) for m in layers)
    frozen = _frozen_state(model)
    batch = _batch(arch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(12):
        model.train()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % 4 == 3:  # train -> eval -> train (bitsandbytes once broke here on AVX512-BF16 CPUs)
            model.eval()
            with torch.no_grad():
                model(**batch)
    assert losses[-1] < 0.8 * losses[0], losses
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) > 0 for p in lora_b)  # gradients reached every adapter
    after = _frozen_state(model)
    assert frozen.keys() == after.keys()
    assert all(torch.equal(frozen[n], after[n]) for n in frozen)


@pytest.mark.parametrize(
    "backend,bits", [("bitsandbytes", 4), ("bitsandbytes", 8), ("torch", 4), ("torch", 8)]
)
def test_parameter_count_is_in_logical_weights(tiny_models, backend, bits):
    plain = count_params(_model(tiny_models, "bert", "[full]"))["total"]
    model = _model(tiny_models, "bert", "[full]")
    cfg = load_config(None, [f"methods=[{{name: quant, backend: {backend}, bits: {bits}}}, lora]"]).methods[0]
    model = get_method("quant").apply(model, cfg, MethodContext("classification", 0, ("quant", "lora")))
    layers = quantized_layers(model)
    stored = sum(m.weight.numel() for m in layers)
    logical = sum(m.in_features * m.out_features for m in layers)
    assert len(layers) == 18 and stored == (logical // 2 if bits == 4 else logical)
    assert sum(p.numel() for p in model.parameters()) == plain - logical + stored  # what numel() would say
    assert count_params(model)["total"] == plain
    with_lora = count_params(_model(tiny_models, "bert", f"[{{name: quant, backend: {backend}}}, lora]"))
    assert with_lora["total"] == count_params(_model(tiny_models, "bert", "[lora]"))["total"]


def test_heads_pooler_and_embeddings_stay_full_precision(tiny_models):
    model = _model(tiny_models, "bert", "[{name: quant, backend: torch, skip_modules: [output]}, lora]")
    names = [n for n, m in model.named_modules() if hasattr(m, "leantune_source_dtype")]
    assert not any(s in n for n in names for s in ("classifier", "pooler", "embeddings", "output"))
    assert len(names) == 3 * 4  # query, key, value, intermediate.dense of 3 blocks; both `output`s skipped


def test_qlora_run_reports_bytes_and_its_adapter_loads_onto_the_quantised_base(
    base_overrides, tiny_models, tmp_path
):
    from leantune.recipes.common import load_run_config, load_trained_model
    from leantune.recipes.train import run_train

    methods = "methods=[{name: quant, backend: bitsandbytes}, {name: lora, dropout: 0.0}]"
    overrides = [*base_overrides, methods, "train.max_steps=6", "train.eval_every=2", "train.log_every=1"]
    summary = run_train(load_config(None, overrides))  # train -> eval -> train through the real trainer
    unquantized = count_params(_model(tiny_models, "bert", "[{name: lora, dropout: 0.0}]"))
    assert summary["params"]["total"] == unquantized["total"]
    report = summary["method_reports"]["quant"]
    assert report["quantized_layers"] == 18 and report["backend"] == "bitsandbytes"
    assert report["weight_bytes_unquantized"] == 4 * report["quantized_weights"]
    assert 0 < report["weight_bytes_quantized"] < report["weight_bytes_unquantized"] / 2
    before, after = report["weight_bytes_unquantized"], report["weight_bytes_quantized"]
    assert report["weight_bytes_saved"] == before - after

    out = tmp_path / "run"
    loaded = load_trained_model(out, load_run_config(out))
    assert len(quantized_layers(loaded)) == 18  # the run's quant re-applied before its adapter
    assert any(type(m).__name__ == "Params4bit" for m in loaded.parameters())
    saved = json.loads((out / "model" / "adapter_config.json").read_text())
    assert saved["r"] == 8
    lora_b = [p for n, p in loaded.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) > 0 for p in lora_b)
    # merging is refused (tests/test_quant_reload.py): codes cannot absorb the update


@pytest.mark.parametrize(
    "methods,expected",
    [
        ("[lora, quant]", "must come before"),
        ("[quant]", "put an adapter after it"),
        ("[quant, full]", "cannot train"),
        ("[{name: quant, bits: 8, quant_type: fp4}, lora]", "quant_type applies to bits: 4"),
        ("[{name: quant, blocksize: 48}, lora]", "blocksize"),
    ],
)
def test_bad_quant_configs_are_one_line_user_errors(capsys, base_overrides, tmp_path, methods, expected):
    line = cli_err(capsys, "train", *base_overrides, f"methods={methods}")
    assert expected in line
    assert not (tmp_path / "run").exists()


def test_qlora_resumes_exactly(base_overrides, tmp_path):
    """Only the adapter is checkpointed: the base is quantised again, identically, on --resume."""
    from leantune.recipes.train import run_train

    overrides = [*base_overrides, "methods=[quant, lora]", "train.max_steps=8", "train.save_every=4"]
    whole = run_train(load_config(None, overrides))
    root = tmp_path / "run" / "checkpoints"
    (root / "latest").write_text("step-00000004")  # as if the run had been killed after step 4
    (tmp_path / "run" / "summary.json").unlink()
    resumed = run_train(load_config(None, overrides), resume=True)
    assert resumed["train"]["resumed"]
    assert resumed["weights_sha256_per_rank"] == whole["weights_sha256_per_rank"]
    assert resumed["test"] == whole["test"]
