"""`leantune generate` and `leantune predict` on finished tiny runs: numbers against the model itself."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import cli_err, write_csv

CHAT_ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"say {w}"},
            {"role": "assistant", "content": f"{w} {w}"},
        ]
    }
    for w in ["red", "blue", "green", "black", "white"] * 6
]
COMMON = [
    "model.max_length=48",
    "train.batch_size=8",
    "train.max_steps=4",
    "train.lr=1e-2",
    "train.num_threads=1",
    "train.save_every=null",
    "output.tensorboard=false",
]


def _train(overrides: list[str]) -> Path:
    from leantune.config import load_config
    from leantune.recipes.train import run_train

    cfg = load_config(None, overrides)
    run_train(cfg)
    return Path(cfg.output.dir)


@pytest.fixture(scope="module")
def chat_run(tiny_models, tmp_path_factory) -> Path:
    """A LoRA (adapter) run on chat data, tiny Llama, fallback template."""
    root = tmp_path_factory.mktemp("chat_run")
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS))
    return _train(
        [
            "task=causal_lm",
            f"model.name={tiny_models['llama']}",
            f"data.source={data}",
            "data.format=messages",
            "data.system_prompt=Repeat the colour.",
            *COMMON,
            f"output.dir={root / 'run'}",
        ]
    )


@pytest.fixture(scope="module")
def text_run(tiny_models, tmp_path_factory) -> Path:
    """A full fine-tuning run (no adapter) on prompt/response text, tiny GPT-2."""
    root = tmp_path_factory.mktemp("text_run")
    rows = [{"text": f"say {w}", "label": f"{w} {w}"} for w in ["red", "blue", "green"] * 10]
    data = write_csv(root / "sft.csv", rows)
    return _train(
        [
            "task=causal_lm",
            f"model.name={tiny_models['gpt2']}",
            f"data.source={data}",
            "methods=[full]",
            *COMMON,
            f"output.dir={root / 'run'}",
        ]
    )


def _direct(run: Path, ids: list[int], n: int, **kw) -> str:
    """model.generate called directly on the run's model, no leantune decoding code in between."""
    from leantune.models.loader import load_tokenizer
    from leantune.recipes.common import load_run_config, load_trained_model

    cfg = load_run_config(run)
    tok = load_tokenizer(str(run / "model"))
    model = load_trained_model(run, cfg).eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            **kw,
        )
    return tok.decode(out[0, len(ids) :], skip_special_tokens=True).strip()


def test_generate_chat_run_greedy_equals_model_generate(chat_run, capsys):
    from leantune.cli import main
    from leantune.models.loader import load_tokenizer

    tok = load_tokenizer(str(chat_run / "model"))
    # the template the run saved, applied independently of data/chat.py
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Repeat the colour."}, {"role": "user", "content": "say red"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text.endswith("### User:\nsay red\n\n### Assistant:\n")
    expected = _direct(chat_run, tok(text, add_special_tokens=False)["input_ids"], 6)
    outs = []
    for _ in range(2):
        capsys.readouterr()
        assert main(["generate", str(chat_run), "say red", "--max-new-tokens", "6"]) == 0
        outs.append(capsys.readouterr().out.strip())
    assert outs[0] == outs[1] == expected  # deterministic and equal to model.generate
    assert expected  # it wrote something


def test_generate_full_run_file_out_and_sampling(text_run, tmp_path, capsys):
    from leantune.models.loader import load_tokenizer
    from leantune.recipes.generate import run_generate

    tok = load_tokenizer(str(text_run / "model"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "say red", "id": 1}\n{"prompt": "say green please", "id": 2}\n')
    out = tmp_path / "gen" / "generations.jsonl"
    records = run_generate(text_run, file=prompts, out=out, max_new_tokens=5)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == records and [r["id"] for r in written] == [1, 2]
    for r in written:  # batched (left-padded) greedy equals unbatched model.generate per prompt
        assert r["generation"] == _direct(text_run, tok(r["prompt"])["input_ids"], 5)
    # sampled decoding: the same seed gives the same text, and it equals seeded model.generate
    a = run_generate(text_run, "say blue", temperature=1.5, top_p=0.9, seed=7, max_new_tokens=8)
    b = run_generate(text_run, "say blue", temperature=1.5, top_p=0.9, seed=7, max_new_tokens=8)
    assert a == b
    torch.manual_seed(7)
    sampled = _direct(text_run, tok("say blue")["input_ids"], 8, do_sample=True, temperature=1.5, top_p=0.9)
    assert a[0]["generation"] == sampled
    # an existing output is never overwritten
    before = out.read_bytes()
    capsys.readouterr()
    cli_err(capsys, "generate", text_run, "--file", prompts, "--out", out)
    assert out.read_bytes() == before


@pytest.fixture(scope="module")
def classification_run(tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    from tests.conftest import make_sentiment_rows

    root = tmp_path_factory.mktemp("cls_run")
    data = write_csv(root / "sentiment.csv", make_sentiment_rows(320))
    run = _train(
        [
            f"model.name={tiny_models['bert']}",
            "model.max_length=16",
            f"data.source={data}",
            "train.batch_size=16",
            "methods=[full]",
            "train.lr=3e-3",
            "train.epochs=3",
            "train.num_threads=1",
            "train.save_every=null",
            "output.tensorboard=false",
            f"output.dir={root / 'run'}",
        ]
    )
    held_out = write_csv(root / "held_out.csv", make_sentiment_rows(96, seed=5))
    return run, held_out


def test_predict_matches_logits_and_eval(classification_run, tmp_path, capsys):
    from leantune.data.tasks import collate
    from leantune.models.loader import load_tokenizer
    from leantune.recipes.common import load_run_config, load_trained_model
    from leantune.recipes.evaluate import run_eval
    from leantune.recipes.predict import run_predict

    run, data = classification_run
    out = tmp_path / "predictions.csv"
    result = run_predict(run, data, out)
    with out.open() as fh:
        written = list(csv.DictReader(fh))
    cfg = load_run_config(run)
    names = cfg.data.label_names
    assert len(written) == 96 and set(written[0]) == {"text", "label", "prediction", "prob_neg", "prob_pos"}
    # the labels are the arg-max of the model's logits on the same rows
    tok = load_tokenizer(str(run / "model"))
    model = load_trained_model(run, cfg).eval()
    texts = [r["text"] for r in written]
    enc = tok(texts, truncation=True, max_length=16)
    feats = [{k: enc[k][i] for k in enc} for i in range(len(texts))]
    with torch.no_grad():
        logits = model(**collate(feats, tok.pad_token_id)).logits
    assert [r["prediction"] for r in written] == [names[i] for i in logits.argmax(-1).tolist()]
    probs = torch.softmax(logits, -1)
    assert max(abs(float(r["prob_pos"]) - float(p[1])) for r, p in zip(written, probs, strict=True)) < 1e-5
    # and its accuracy is the one `leantune eval` reports on the same file
    evaluated = run_eval(run, str(data))
    assert result["accuracy"] == pytest.approx(evaluated["accuracy"], abs=1e-12)
    assert result["accuracy"] > 0.8  # the tiny BERT learnt the toy task
    capsys.readouterr()
    cli_err(capsys, "predict", run, data, "--out", out)  # never overwrites


def test_generate_and_predict_refuse_the_other_task(classification_run, chat_run, tmp_path, capsys):
    run, data = classification_run
    cli_err(capsys, "generate", run, "hello")
    cli_err(capsys, "predict", chat_run, data, "--out", tmp_path / "p.csv")
    cli_err(capsys, "generate", chat_run, "hi", "--temperature", "nan")
    cli_err(capsys, "generate", chat_run)
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.slow
def test_smollm2_chat_run_answers_through_its_template(tmp_path, capsys):
    """The real chat model: two LoRA steps on messages data, then `generate` through its ChatML template
    still answers what the base model answers (OFFLINE.md: "The capital of France is Paris.")."""
    from leantune.cli import main

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS))
    run = _train(
        [
            "task=causal_lm",
            "model.name=embedded:smollm2",
            f"data.source={data}",
            "data.format=messages",
            "data.packing=true",
            "model.max_length=64",
            "train.batch_size=2",
            "train.max_steps=2",
            "train.lr=1e-5",
            "train.num_threads=1",
            "train.save_every=null",
            "output.tensorboard=false",
            f"output.dir={tmp_path / 'run'}",
        ]
    )
    capsys.readouterr()
    assert main(["generate", str(run), "What is the capital of France?", "--max-new-tokens", "12"]) == 0
    assert "Paris" in capsys.readouterr().out
