"""Bottleneck adapters and their composition with freeze and LoRA: exact start, exact counts, learning,
save -> reload equality, and the combinations that are refused."""

from __future__ import annotations

import json

import pytest
import torch

from leantune.config import load_config
from leantune.errors import UserError
from leantune.methods import MethodContext, apply_methods
from leantune.models.loader import load_model
from leantune.recipes.common import load_run_config, load_trained_model
from leantune.recipes.train import run_train
from tests.conftest import cli_err

H = 32  # hidden size of the tiny models
HEAD = H * 2 + 2  # the tiny BERT's classifier: 2 labels


def per_adapter(h: int, rf: int) -> int:
    m = h // rf
    return 2 * h * m + m + h


def _methods(task: str, methods: str, model_name: str):
    return load_config(None, [f"model.name={model_name}", f"task={task}", f"methods={methods}"]).methods


def _wrap(path, task: str, methods: str):
    model = load_model(str(path), task)
    return apply_methods(model, _methods(task, methods, str(path)), MethodContext(task=task, seed=0))


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.fixture(scope="module")
def six_block_bert(tmp_path_factory):
    """A tiny BERT with 6 blocks (the shared tiny one has 3) for freeze-4 compositions."""
    import transformers

    from leantune.models.loader import load_tokenizer

    tok = load_tokenizer("embedded:minilm")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=len(tok),
        hidden_size=H,
        num_hidden_layers=6,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
    )
    out = tmp_path_factory.mktemp("bert6")
    transformers.BertForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


IDS = torch.randint(1000, 2000, (3, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("arch", "task", "kind"),
    [
        ("bert", "classification", "houlsby"),
        ("bert", "classification", "pfeiffer"),
        ("llama", "causal_lm", "houlsby"),
        ("gpt2", "causal_lm", "pfeiffer"),
    ],
)
def test_adapters_start_as_the_base_model(tiny_models, arch, task, kind):
    base = load_model(str(tiny_models[arch]), task)
    ref = _logits(base, IDS)
    wrapped = _wrap(tiny_models[arch], task, f"[{{name: adapters, type: {kind}, reduction_factor: 4}}]")
    assert torch.allclose(_logits(wrapped, IDS), ref, atol=1e-6, rtol=0)
    # and the adapters really are on the path: moving `up` changes the output
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if ".up." in name:
                p.normal_(0, 0.1)
    assert not torch.allclose(_logits(wrapped, IDS), ref, atol=1e-4)


@pytest.mark.parametrize(
    ("kind", "rf", "sites"), [("houlsby", 4, 2), ("pfeiffer", 16, 1), ("houlsby", 32, 2)]
)
def test_trainable_count_is_the_formula(tiny_models, kind, rf, sites):
    model = _wrap(
        tiny_models["bert"], "classification", f"[{{name: adapters, type: {kind}, reduction_factor: {rf}}}]"
    )
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    blocks = 3
    assert sum(trainable.values()) == blocks * sites * per_adapter(H, rf) + HEAD
    # houlsby rf 4: 3 blocks x 2 x (2*32*8 + 8 + 32) = 3312, + head 66 = 3378
    assert all("adapter_" in n or n.startswith("classifier.") for n in trainable)


def test_causal_lm_trains_only_adapters(tiny_models):
    model = _wrap(tiny_models["llama"], "causal_lm", "[{name: adapters, reduction_factor: 4}]")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 3 * 2 * per_adapter(H, 4) == 3312


def test_bad_adapter_configs_are_one_line(tiny_models, capsys):
    with pytest.raises(UserError, match="reduction_factor=64 leaves no hidden unit"):
        _wrap(tiny_models["bert"], "classification", "[{name: adapters, reduction_factor: 64}]")
    with pytest.raises(UserError, match="layers=\\[5\\] but the model has 3 blocks"):
        _wrap(tiny_models["bert"], "classification", "[{name: adapters, layers: [5]}]")
    line = cli_err(capsys, "train", "methods=[{name: adapters, type: bottleneck}]")
    assert "houlsby" in line and "pfeiffer" in line
    line = cli_err(capsys, "train", "methods=[{name: adapters, reduction_factor: 0}]")
    assert "reduction_factor" in line


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        ("[lora, freeze]", "freeze must come before lora"),
        ("[adapters, freeze]", "freeze must come before adapters"),
        ("[adapters, adapters]", "'adapters' is listed twice"),
        ("[{name: freeze, layers: 3}, adapters]", "freeze froze all 3 blocks"),
        ("[{name: freeze, layers: 3}, lora]", "freeze froze all 3 blocks"),
        ("[adapters, lora]", "lora must come before adapters"),
        ("[full, adapters]", "drop one of them"),
    ],
)
def test_senseless_combinations_are_refused(tiny_models, methods, message):
    with pytest.raises(UserError, match=message) as info:
        _wrap(tiny_models["bert"], "classification", methods)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "methods",
    [
        "[lora, freeze]",
        "[adapters, adapters]",
        "[adapters, lora]",
        "[prompt, lora]",
        "[lora, bitfit]",
        "[prefix]",
    ],
)
def test_senseless_combinations_fail_at_validation(capsys, methods):
    """Refused from the names alone, before any model or data loads: exit 2, one line."""
    line = cli_err(capsys, "train", f"methods={methods}")
    assert "must come before" in line or "listed twice" in line or "cannot" in line or "base weights" in line


def _block_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layer") + 1]) if "layer" in parts else None


def test_freeze_then_lora_keeps_lora_out_of_frozen_blocks(six_block_bert):
    model = _wrap(six_block_bert, "classification", "[{name: freeze, layers: 4}, {name: lora, r: 4}]")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    assert not [n for n in trainable if (_block_of(n) or 0) < 4 and _block_of(n) is not None]
    assert {_block_of(n) for n in trainable if "lora_" in n} == {4, 5}
    # explicit layers win over freeze
    model = _wrap(
        six_block_bert, "classification", "[{name: freeze, layers: 4}, {name: lora, r: 4, layers: [1]}]"
    )
    assert {_block_of(n) for n, p in model.named_parameters() if p.requires_grad and "lora_" in n} == {1}


@pytest.mark.parametrize(
    "method",
    [
        "{name: lora_sp, r: 4}",
        "{name: dynamic_rank, budget: 1GiB}",
        "{name: adalora, init_r: 4, target_r: 2}",
    ],
)
def test_every_lora_kind_skips_the_frozen_blocks(six_block_bert, method):
    model = _wrap(six_block_bert, "classification", f"[{{name: freeze, layers: 4}}, {method}]")
    assert {_block_of(n) for n, p in model.named_parameters() if p.requires_grad and "lora_" in n} == {4, 5}


def test_unified_counts_add_up(six_block_bert):
    from leantune.methods import adapters, freeze, lora

    methods = (
        "[{name: freeze, layers: 4}, {name: lora, r: 4, target_modules: [query, value]}, "
        "{name: adapters, reduction_factor: 4}]"
    )
    model = _wrap(six_block_bert, "classification", methods)
    cfgs = _methods("classification", methods, str(six_block_bert))
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    overview = freeze.report(model, cfgs[0])
    lora_r, adapters_r = lora.report(model, cfgs[1]), adapters.report(model, cfgs[2])
    assert overview["frozen_blocks"] == [0, 1, 2, 3]
    assert sum(overview["trainable_by_block"].values()) == total
    assert sum(overview["trainable_by_method"].values()) == total
    lora_per_block = 2 * (4 * H + H * 4)  # query and value: A (4 x 32) + B (32 x 4)
    adapters_per_block = 2 * per_adapter(H, 4)
    assert lora_r["trainable_per_block"] == {"4": lora_per_block, "5": lora_per_block}
    assert adapters_r["trainable_per_block"] == {"4": adapters_per_block, "5": adapters_per_block}
    assert overview["trainable_by_method"] == {
        "lora": 2 * lora_per_block,
        "adapters": 2 * adapters_per_block,
        "head": HEAD,
    }
    assert lora_r["trainable"] + adapters_r["trainable"] + lora_r["head"] == total == 1024 + 2208 + 66
    assert overview["trainable_by_block"] == {
        "4": lora_per_block + adapters_per_block,
        "5": lora_per_block + adapters_per_block,
        "outside_blocks": HEAD,
    }


# --- a real run: learns, saves, reloads, exports -----------------------------------------------------


def _losses(run_dir) -> list[float]:
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [ln["loss"] for ln in lines if "loss" in ln and ln.get("split") is None]


MINILM_H, MINILM_HEAD = 384, 384 * 2 + 2


@pytest.fixture(scope="module")
def adapters_run(sentiment_csv, tmp_path_factory):
    """On the real MiniLM (~6 s): a frozen *random* tiny BERT gives adapters nothing to adapt (they
    stayed at chance there in 15 epochs), while pretrained features make the toy task easy."""
    out = tmp_path_factory.mktemp("adapters") / "run"
    overrides = [
        "model.name=embedded:minilm",
        "model.max_length=16",
        f"data.source={sentiment_csv}",
        "train.batch_size=16",
        "train.lr=3e-3",
        "train.epochs=2",
        "train.num_threads=1",
        "train.save_every=1000",
        "train.log_every=5",
        "output.tensorboard=false",
        f"output.dir={out}",
        "methods=[{name: adapters, reduction_factor: 16}]",
    ]
    return out, run_train(load_config(None, overrides))


def test_adapters_learn_the_toy_task(adapters_run):
    out, summary = adapters_run
    losses = _losses(out)
    print("adapters losses", losses[0], losses[-3:], summary["test"])
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    assert summary["test"]["accuracy"] > summary["test"]["majority_accuracy"] + 0.2, summary["test"]
    # 6 blocks x 2 adapters x (2*384*24 + 24 + 384) + head 770 = 226,850
    assert summary["params"]["trainable"] == 6 * 2 * per_adapter(MINILM_H, 16) + MINILM_HEAD == 226_850
    report = summary["method_reports"]["adapters"]
    assert report["trainable"] + report["head_trained_by_adapters"] == summary["params"]["trainable"]
    assert (out / "model" / "adapters.safetensors").is_file()
    saved = json.loads((out / "model" / "adapters.json").read_text())
    assert saved["layers"] == [0, 1, 2, 3, 4, 5] and saved["bottleneck"] == 24
    assert saved["sites"] == ["attn", "ffn"]


def test_save_reload_gives_identical_logits(tiny_models, tmp_path):
    from leantune.methods.adapters import attach_saved

    model = _wrap(
        tiny_models["bert"], "classification", "[{name: adapters, type: pfeiffer, reduction_factor: 4}]"
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    model.save_pretrained(str(tmp_path / "m"))
    with torch.no_grad():
        reloaded = attach_saved(load_model(str(tmp_path / "m"), "classification"), tmp_path / "m")
    assert torch.equal(_logits(reloaded, IDS), _logits(model, IDS))
    assert not any("adapter" in k for k in _safetensors_keys(tmp_path / "m" / "model.safetensors"))


def _safetensors_keys(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return list(fh.keys())


def test_run_reloads_for_eval_and_exports_without_merge(adapters_run, capsys, tmp_path):
    from leantune.methods.adapters import attach_saved
    from leantune.recipes.evaluate import run_eval

    out, summary = adapters_run
    result = run_eval(out, None)
    assert result["accuracy"] == pytest.approx(summary["test"]["accuracy"], abs=1e-9)
    assert result["loss"] == pytest.approx(summary["test"]["loss"], rel=1e-5)
    reloaded = load_trained_model(out, load_run_config(out))
    from leantune.cli import main

    assert main(["export", str(out), "--out", str(tmp_path / "exp")]) == 0
    labels = load_run_config(out).data.label_names
    exported = attach_saved(
        load_model(str(tmp_path / "exp"), "classification", label_names=labels), tmp_path / "exp"
    )
    assert torch.equal(_logits(exported, IDS), _logits(reloaded, IDS))
    capsys.readouterr()
    line = cli_err(capsys, "export", out, "--merge", "--out", tmp_path / "merged")
    assert "cannot be exported with --merge" in line and "adapters" in line
    assert not (tmp_path / "merged").exists()


def test_unified_run_saves_and_reloads(six_block_bert, sentiment_csv, tmp_path, capsys):
    """[freeze, lora, adapters]: peft saves LoRA + head, adapters their own files; eval/export reload both."""
    from leantune.methods.adapters import attach_saved

    out = tmp_path / "run"
    overrides = [
        f"model.name={six_block_bert}",
        "model.max_length=16",
        f"data.source={sentiment_csv}",
        "train.batch_size=16",
        "train.max_steps=4",
        "train.num_threads=1",
        "train.save_every=1000",
        "output.tensorboard=false",
        f"output.dir={out}",
        "methods=[{name: freeze, layers: 4}, {name: lora, r: 4, dropout: 0.0}, "
        "{name: adapters, reduction_factor: 4}]",
    ]
    summary = run_train(load_config(None, overrides))
    reports = summary["method_reports"]
    assert sum(reports["freeze"]["trainable_by_method"].values()) == summary["params"]["trainable"]
    assert reports["adapters"]["layers"] == [4, 5]
    assert (out / "model" / "adapter_config.json").is_file() and (out / "model" / "adapters.json").is_file()
    model = load_trained_model(out, load_run_config(out))
    assert sorted({_block_of(n) for n, _ in model.named_parameters() if "adapter_" in n}) == [4, 5]
    from leantune.recipes.evaluate import run_eval

    assert run_eval(out, None)["loss"] == pytest.approx(summary["test"]["loss"], rel=1e-5)
    from leantune.cli import main

    assert main(["export", str(out), "--out", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "adapters.safetensors").is_file()
    from peft import PeftModel

    base = attach_saved(load_model(str(six_block_bert), "classification"), tmp_path / "exp")
    exported = PeftModel.from_pretrained(base, str(tmp_path / "exp"))
    assert torch.equal(_logits(exported, IDS), _logits(model, IDS))


def test_shipped_unified_config_trains_two_steps(six_block_bert, sentiment_csv, tmp_path):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "unified.yaml"
    cfg = load_config(path)
    assert [m.name for m in cfg.methods] == ["freeze", "lora", "adapters"]
    out = tmp_path / "run"
    summary = run_train(
        load_config(
            path,
            [
                f"model.name={six_block_bert}",
                "model.max_length=16",
                f"data.source={sentiment_csv}",
                "train.batch_size=16",
                "train.max_steps=2",
                "train.num_threads=1",
                "output.tensorboard=false",
                f"output.dir={out}",
            ],
        )
    )
    assert summary["train"]["steps"] == 2
    overview = summary["method_reports"]["freeze"]
    assert overview["frozen_blocks"] == [0, 1, 2]
    # lora r=8 on query/value of blocks 3-5: 3 x 2 x (8*32 + 32*8); pfeiffer rf 16: 3 x (2*32*2 + 2 + 32)
    assert overview["trainable_by_method"] == {
        "lora": 3 * 2 * 512,
        "adapters": 3 * per_adapter(H, 16),
        "head": HEAD,
    }
    assert sum(overview["trainable_by_block"].values()) == summary["params"]["trainable"] == 3072 + 486 + 66
