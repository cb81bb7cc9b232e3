"""`leantune export` and `leantune eval` on finished runs: merged == adapter, exact metrics, no overwrite."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from leantune.cli import main
from leantune.config import dump_config, load_config
from leantune.recipes.train import run_train
from tests.conftest import cli_err, make_sentiment_rows, write_csv

LORA = "methods=[{name: lora, r: 16, dropout: 0.0, target_modules: all-linear}]"
VOCAB = 30522  # the tiny models borrow the embedded MiniLM WordPiece vocabulary
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


# --- runs, trained once per module -------------------------------------------------------------------


@pytest.fixture(scope="module")
def _run_cache(tmp_path_factory) -> dict:
    return {"root": tmp_path_factory.mktemp("runs")}


@pytest.fixture
def trained(base_overrides, _run_cache):
    """trained(name, *overrides) -> (run_dir, summary); each distinct run is trained once per module."""

    def _get(name: str, *extra: str) -> tuple[Path, dict]:
        if name not in _run_cache:
            out = _run_cache["root"] / name
            summary = run_train(load_config(None, [*base_overrides, *extra, f"output.dir={out}"]))
            _run_cache[name] = (out, summary)
        return _run_cache[name]

    return _get


@pytest.fixture
def lora_run(trained):
    # LoRA on a random-initialised encoder learns slowly and only for some data orders (seeded, so this is
    # deterministic): more epochs and a higher lr than base_overrides, and the plain shuffled order
    return trained("lora", LORA, "train.epochs=10", "train.lr=1e-2", "train.group_by_length=false")


@pytest.fixture
def full_run(trained):
    return trained("full", "methods=[full]")


def _qa_rows(n: int, offset: int = 0) -> list[dict]:
    return [
        {"text": f"question {i % 7}", "label": f"answer {i % 7} is {'yes' if i % 2 else 'no'}"}
        for i in range(offset, offset + n)
    ]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def gpt2_run(tiny_models, _run_cache):
    if "gpt2" not in _run_cache:
        root = _run_cache["root"]
        data = _write_jsonl(root / "qa.jsonl", _qa_rows(96))
        out = root / "gpt2"
        summary = run_train(
            load_config(
                None,
                [
                    "task=causal_lm",
                    f"model.name={tiny_models['gpt2']}",
                    f"data.source={data}",
                    "model.max_length=24",
                    "train.batch_size=16",
                    "train.lr=1e-2",
                    "train.epochs=4",
                    "train.num_threads=1",
                    "train.save_every=1000",
                    "methods=[{name: lora, r: 8, dropout: 0.0, target_modules: all-linear}]",
                    "output.tensorboard=false",
                    f"output.dir={out}",
                ],
            )
        )
        _run_cache["gpt2"] = (out, summary)
    return _run_cache["gpt2"]


# --- helpers -------------------------------------------------------------------------------------------


def cli_ok(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, f"exit {code}, stderr: {captured.err}"
    return captured.out


def run_cfg(run_dir: Path):
    return load_config(run_dir / "config.yaml")


def adapter_model(run_dir: Path):
    """Base + saved adapter, loaded the way a user would with peft."""
    from peft import PeftModel

    from leantune.models.loader import load_model

    cfg = run_cfg(run_dir)
    base = load_model(cfg.model.name, cfg.task, cfg.model.dtype, cfg.data.label_names)
    return PeftModel.from_pretrained(base, str(run_dir / "model")).eval()


def batch(run_dir: Path, texts: list[str], max_length: int = 16) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run_dir / "model"))
    return dict(tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


@torch.no_grad()
def logits(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.eval()(**inputs).logits


def safetensor_keys(folder: Path) -> list[str]:
    keys: list[str] = []
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            keys += list(fh.keys())
    assert keys, f"no safetensors weights in {folder}"
    return keys


def tree_digest(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


TEXTS = [r["text"] for r in make_sentiment_rows(24, seed=11)]


# --- export --------------------------------------------------------------------------------------------


def test_merged_lora_export_matches_adapter(capsys, lora_run, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from leantune.models.loader import load_model

    run_dir, _ = lora_run
    out = cli_ok(capsys, "export", run_dir, "--merge")
    merged_dir = run_dir / "merged"  # the default destination
    assert str(merged_dir) in out
    assert (merged_dir / "config.json").is_file()
    assert not (merged_dir / "adapter_config.json").exists()
    keys = safetensor_keys(merged_dir)
    assert not [k for k in keys if "lora_" in k or "modules_to_save" in k or "original_module" in k], keys
    for name in TOKENIZER_FILES[:2]:
        assert (merged_dir / name).is_file(), name

    merged = AutoModelForSequenceClassification.from_pretrained(str(merged_dir))
    adapter = adapter_model(run_dir)
    inputs = batch(run_dir, TEXTS)
    got, want = logits(merged, inputs), logits(adapter, inputs)
    assert (got - want).abs().max().item() <= 1e-4

    # the equality above means something only if the adapter changed the model
    cfg = run_cfg(run_dir)
    torch.manual_seed(123)
    untrained = load_model(cfg.model.name, cfg.task, cfg.model.dtype, cfg.data.label_names)
    assert (logits(untrained, inputs) - want).abs().max().item() > 1e-2
    base_q = untrained.bert.encoder.layer[0].attention.self.query.weight
    merged_q = merged.bert.encoder.layer[0].attention.self.query.weight
    assert (base_q - merged_q).abs().max().item() > 1e-3, "LoRA delta was not folded into the base weights"

    # labels survive both in the adapter model and in the merged folder
    assert merged.config.id2label == {0: "neg", 1: "pos"}
    assert merged.config.label2id == {"neg": 0, "pos": 1}
    assert adapter.config.id2label == {0: "neg", 1: "pos"}


def test_unmerged_lora_export_is_a_loadable_adapter(capsys, lora_run, tmp_path):
    from peft import PeftModel

    from leantune.models.loader import load_model

    run_dir, _ = lora_run
    dest = tmp_path / "adapter"
    cli_ok(capsys, "export", run_dir, "--out", dest)
    assert (dest / "adapter_config.json").is_file()
    assert any("lora_" in k for k in safetensor_keys(dest))
    cfg = run_cfg(run_dir)
    base = load_model(cfg.model.name, cfg.task, cfg.model.dtype, cfg.data.label_names)
    reloaded = PeftModel.from_pretrained(base, str(dest))
    inputs = batch(run_dir, TEXTS)
    assert torch.equal(logits(reloaded, inputs), logits(adapter_model(run_dir), inputs))


def test_export_never_overwrites(capsys, lora_run, tmp_path):
    run_dir, _ = lora_run
    dest = tmp_path / "exp"
    cli_ok(capsys, "export", run_dir, "--merge", "--out", dest)
    before = tree_digest(dest)
    line = cli_err(capsys, "export", run_dir, "--merge", "--out", dest)
    assert "already exists" in line and str(dest) in line
    assert tree_digest(dest) == before
    line = cli_err(capsys, "export", run_dir, "--out", dest)  # without --merge too
    assert tree_digest(dest) == before
    assert not list(tmp_path.glob(".*tmp*")), "a temporary folder was left behind"


def test_failed_export_leaves_nothing_behind(lora_run, tmp_path, monkeypatch):
    import leantune.models.loader as loader
    from leantune.recipes.export import run_export

    def broken(name):
        raise RuntimeError("disk full")

    monkeypatch.setattr(loader, "load_tokenizer", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        run_export(lora_run[0], merge=True, out=tmp_path / "dest")
    assert list(tmp_path.iterdir()) == []


def test_export_of_a_non_run_is_one_line(capsys, tmp_path):
    line = cli_err(capsys, "export", tmp_path / "nothing", "--merge", "--out", tmp_path / "x")
    assert "not a leantune run" in line
    assert not (tmp_path / "x").exists()


def test_merged_export_of_full_finetuning(capsys, full_run, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from leantune.models.loader import load_model

    run_dir, _ = full_run
    dest = tmp_path / "full_merged"
    cli_ok(capsys, "export", run_dir, "--merge", "--out", dest)
    assert not (dest / "adapter_config.json").exists()
    merged = AutoModelForSequenceClassification.from_pretrained(str(dest))
    cfg = run_cfg(run_dir)
    trained = load_model(str(run_dir / "model"), cfg.task, cfg.model.dtype, cfg.data.label_names)
    inputs = batch(run_dir, TEXTS)
    assert (logits(merged, inputs) - logits(trained, inputs)).abs().max().item() <= 1e-6
    base = load_model(cfg.model.name, cfg.task, cfg.model.dtype, cfg.data.label_names)
    assert (logits(base, inputs) - logits(merged, inputs)).abs().max().item() > 1e-2
    assert merged.config.id2label == {0: "neg", 1: "pos"}


# --- eval ----------------------------------------------------------------------------------------------


@torch.no_grad()
def own_accuracy(run_dir: Path, rows: list[dict]) -> float:
    model = adapter_model(run_dir)
    names = run_cfg(run_dir).data.label_names
    correct = 0
    for start in range(0, len(rows), 32):
        chunk = rows[start : start + 32]
        preds = logits(model, batch(run_dir, [r["text"] for r in chunk])).argmax(-1).tolist()
        correct += sum(p == names.index(r["label"]) for p, r in zip(preds, chunk, strict=True))
    return correct / len(rows)


def test_eval_on_another_csv(capsys, lora_run, tmp_path):
    run_dir, _ = lora_run
    rows = make_sentiment_rows(150, seed=7)
    data = write_csv(tmp_path / "other.csv", rows)
    out_json = tmp_path / "metrics.json"
    cli_ok(capsys, "eval", run_dir, "--data", data, "--out", out_json)
    result = json.loads(out_json.read_text())
    assert result["n"] == len(rows) and result["data"] == str(data)
    assert result["accuracy"] == pytest.approx(own_accuracy(run_dir, rows), abs=1e-12)
    assert result["accuracy"] >= result["majority_accuracy"] + 0.2, result


def test_eval_of_a_file_uses_all_of_it_whatever_the_run_subsampled(capsys, lora_run, tmp_path, monkeypatch):
    """max_train_samples of the run is about training; a --data file (also given as ~/...) is used whole."""
    run_dir, _ = lora_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("merged", "checkpoints"))
    cfg = run_cfg(run_dir)
    cfg.data.max_train_samples = 10
    cfg.data.max_eval_samples = 5
    (copy / "config.yaml").write_text(dump_config(cfg))
    data = write_csv(tmp_path / "other.csv", make_sentiment_rows(40, seed=3))
    out_json = tmp_path / "m.json"
    cli_ok(capsys, "eval", copy, "--data", data, "--out", out_json)
    assert json.loads(out_json.read_text())["n"] == 40
    monkeypatch.setenv("HOME", str(tmp_path))
    cli_ok(capsys, "eval", copy, "--data", "~/other.csv", "--out", tmp_path / "h.json")
    result = json.loads((tmp_path / "h.json").read_text())
    assert result["n"] == 40 and result["split"] == "train"


def test_eval_unknown_label_names_its_line(capsys, lora_run, tmp_path):
    run_dir, _ = lora_run
    rows = make_sentiment_rows(20, seed=5)
    rows[6]["label"] = "neutral"  # file line 8: the header is line 1
    data = write_csv(tmp_path / "bad.csv", rows)
    out_json = tmp_path / "metrics.json"
    line = cli_err(capsys, "eval", run_dir, "--data", data, "--out", out_json)
    assert "line 8" in line and "'neutral'" in line and str(data) in line
    assert not out_json.exists()


def test_eval_never_overwrites_its_out_file(capsys, lora_run, tmp_path):
    run_dir, _ = lora_run
    out_json = tmp_path / "metrics.json"
    out_json.write_text("keep me\n")
    line = cli_err(capsys, "eval", run_dir, "--out", out_json)
    assert "already exists" in line
    assert out_json.read_text() == "keep me\n"


def test_eval_out_in_a_new_folder(capsys, lora_run, tmp_path):
    run_dir, summary = lora_run
    out_json = tmp_path / "reports" / "deep" / "metrics.json"
    cli_ok(capsys, "eval", run_dir, "--out", out_json)
    assert json.loads(out_json.read_text())["accuracy"] == summary["test"]["accuracy"]


def test_eval_defaults_to_the_runs_test_split(capsys, lora_run, full_run):
    from leantune.recipes.evaluate import run_eval

    for run_dir, summary in (lora_run, full_run):
        capsys.readouterr()
        result = run_eval(run_dir, None)
        assert result["split"] == "test" and result["n"] == summary["data"]["test"]
        assert result["accuracy"] == summary["test"]["accuracy"]
        assert result["loss"] == pytest.approx(summary["test"]["loss"], abs=1e-6)
        assert "accuracy" in capsys.readouterr().out


def test_the_runs_own_tokenizer_is_used(capsys, lora_run, tiny_models, tmp_path):
    """Point the run at a copy of its base model without tokenizer files: eval and export still work."""
    run_dir, summary = lora_run
    base = tmp_path / "base"
    shutil.copytree(tiny_models["bert"], base)
    for name in TOKENIZER_FILES:
        (base / name).unlink(missing_ok=True)
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("merged", "checkpoints"))
    cfg = run_cfg(run_dir)
    cfg.model.name = str(base)
    (copy / "config.yaml").write_text(dump_config(cfg))

    out_json = tmp_path / "m.json"
    cli_ok(capsys, "eval", copy, "--out", out_json)
    assert json.loads(out_json.read_text())["accuracy"] == summary["test"]["accuracy"]
    dest = tmp_path / "merged"
    cli_ok(capsys, "export", copy, "--merge", "--out", dest)
    for name in TOKENIZER_FILES[:2]:
        assert (dest / name).read_bytes() == (run_dir / "model" / name).read_bytes()


# --- causal LM -----------------------------------------------------------------------------------------


def test_causal_lm_export_and_eval(capsys, gpt2_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from leantune.models.loader import load_model
    from leantune.recipes.evaluate import run_eval

    run_dir, summary = gpt2_run
    dest = tmp_path / "merged"
    cli_ok(capsys, "export", run_dir, "--merge", "--out", dest)
    assert not (dest / "adapter_config.json").exists()
    assert not [k for k in safetensor_keys(dest) if "lora_" in k]
    merged = AutoModelForCausalLM.from_pretrained(str(dest))
    cfg = run_cfg(run_dir)
    base = load_model(cfg.model.name, cfg.task, cfg.model.dtype)
    inputs = batch(run_dir, [f"{r['text']} {r['label']}" for r in _qa_rows(8)], max_length=24)
    inputs.pop("token_type_ids", None)
    base_logits = logits(base, inputs).clone()
    adapter = PeftModel.from_pretrained(base, str(run_dir / "model"))
    want = logits(adapter, inputs)
    assert (logits(merged, inputs) - want).abs().max().item() <= 1e-4
    assert (base_logits - want).abs().max().item() > 1e-2

    result = run_eval(run_dir, None)
    assert result["loss"] == pytest.approx(summary["test"]["loss"], abs=1e-6)
    other = _write_jsonl(tmp_path / "other.jsonl", _qa_rows(30, offset=500))
    out_json = tmp_path / "m.json"
    cli_ok(capsys, "eval", run_dir, "--data", other, "--out", out_json)
    result = json.loads(out_json.read_text())
    # a LoRA on a tiny random LM with frozen (tied, near-zero) embeddings cannot sharpen its output much;
    # it must still beat a uniform guess over the vocabulary, which an untrained model is close to
    assert result["n"] == 30 and result["loss"] < math.log(VOCAB) - 0.2, result
