"""Generation-based evaluation: metrics agree with sacrebleu/rouge-score, causal prompts are cut off and
padded on the left correctly, and a tiny T5 that learnt a copy task scores higher than an untrained one."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer

from leantune.cli import main
from leantune.config import load_config
from leantune.data.tasks import load_raw_splits
from leantune.eval.generation import generate_texts, generation_eval, text_metrics
from leantune.models.loader import load_model, load_tokenizer
from leantune.recipes.train import run_train
from tests.conftest import cli_err

REFS = ["the cat sat on the mat today", "a quick brown fox jumps over the lazy dog", "hello there my friend"]
HYPS = ["the cat sat on a mat", "a quick brown fox jumped over the lazy dogs", "hello there my friend"]


def test_identical_texts_score_full_marks():
    m = text_metrics(REFS, REFS)
    assert m["bleu"] == pytest.approx(100.0)
    assert m["chrf"] == pytest.approx(100.0)
    assert m["rouge1"] == m["rouge2"] == m["rougeL"] == pytest.approx(1.0)
    assert m["exact_match"] == 1.0


def test_known_pairs_match_the_libraries():
    m = text_metrics(HYPS, REFS)
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert m["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        direct = sum(scorer.score(r, h)[key].fmeasure for h, r in zip(HYPS, REFS, strict=True)) / 3
        assert m[key] == pytest.approx(direct)
    assert 0 < m["bleu"] < 100
    assert m["rouge1"] > m["rouge2"] > 0
    assert m["exact_match"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_causal_generation_is_the_continuation_of_each_prompt_alone(tiny_models, arch):
    """Batched, left-padded generation gives what each prompt alone gives, without the prompt."""
    torch.set_num_threads(1)
    tok = load_tokenizer(str(tiny_models[arch]))
    model = load_model(str(tiny_models[arch]), "causal_lm", pad_token_id=tok.pad_token_id)
    prompts = ["tell me a story about a cat and a dog", "hi", "the weather is nice"]
    batched = generate_texts(model, tok, prompts, "causal_lm", 32, 6, batch_size=3)
    for prompt, text in zip(prompts, batched, strict=True):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        alone = model.generate(
            input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id
        )
        assert text == tok.decode(alone[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert any(batched), "a random model still emits some text"


# --- a tiny T5 learns a copy task ---------------------------------------------------------------------

WORDS = ["red", "blue", "green", "cat", "dog", "sun"]


def _copy_rows(n: int) -> list[dict]:
    """Two words in, the two words twice out: learnable by a tiny T5 in ~100 steps."""
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        pair = rng.sample(WORDS, 2)
        rows.append({"text": " ".join(pair), "label": " ".join(pair + pair)})
    return rows


@pytest.fixture(scope="module")
def copy_run(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("copy")
    data = root / "copy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _copy_rows(200)))
    cfg = load_config(
        None,
        [
            "task=seq2seq",
            f"model.name={tiny_models['t5']}",
            f"data.source={data}",
            "model.max_length=12",
            "data.max_eval_samples=24",
            "train.batch_size=16",
            "train.lr=3e-2",
            "train.warmup_ratio=0",
            "train.max_steps=100",
            "train.epochs=20",
            "train.save_every=1000",
            "train.num_threads=1",
            "methods=[full]",
            "eval.generate=true",
            "eval.metric=bleu",
            "eval.max_new_tokens=8",
            "output.tensorboard=false",
            f"output.dir={root / 'run'}",
        ],
    )
    return root / "run", run_train(cfg), cfg


def test_copy_task_bleu_beats_the_untrained_model(copy_run, tiny_models):
    run_dir, summary, cfg = copy_run
    test_rows = load_raw_splits(cfg.data).test
    tok = load_tokenizer(str(tiny_models["t5"]))
    untrained = load_model(str(tiny_models["t5"]), "seq2seq")
    before, _ = generation_eval(untrained, tok, test_rows, "text", "label", "seq2seq", 12, 8, 1, 64)
    after = summary["test"]
    assert after["bleu"] > before["bleu"] + 10, (before, after)
    assert after["rouge1"] > before["rouge1"] + 0.2, (before, after)


def test_predictions_file_holds_the_scored_generations(copy_run):
    run_dir, summary, cfg = copy_run
    lines = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    test_rows = load_raw_splits(cfg.data).test
    assert [x["source"] for x in lines] == [r["text"] for r in test_rows]
    assert [x["reference"] for x in lines] == [r["label"] for r in test_rows]
    rescored = text_metrics([x["prediction"] for x in lines], [x["reference"] for x in lines])
    assert rescored == {k: summary["test"][k] for k in rescored}


def test_bleu_selects_the_best_checkpoint(copy_run):
    run_dir, summary, _ = copy_run
    evals = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"validation"' in line
    ]
    assert len(evals) >= 2 and all("bleu" in e for e in evals)  # every validation pass generated
    assert len({e["bleu"] for e in evals}) > 1
    best = max(evals, key=lambda e: e["bleu"])
    assert summary["train"]["metric"] == "bleu"
    assert (summary["train"]["best_metric"], summary["train"]["best_step"]) == (best["bleu"], best["step"])


def test_eval_command_regenerates_the_same_scores(copy_run, tmp_path, capsys):
    run_dir, summary, _ = copy_run
    out = tmp_path / "again.json"
    assert main(["eval", str(run_dir), "--generate", "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    for key in ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match"):
        assert again[key] == pytest.approx(summary["test"][key]), key
    written = Path(str(out).removesuffix(".json") + ".predictions.jsonl")
    assert written.read_text() == (run_dir / "predictions.jsonl").read_text()


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["task=seq2seq", "eval.metric=bleu"], "set eval.generate=true"),
        (["eval.generate=true"], "eval.generate needs task seq2seq or causal_lm"),
        (["task=causal_lm", "data.label_column=null", "eval.generate=true"], "data.label_column"),
        (["task=seq2seq", "eval.mmlu_shots=5"], "eval.mmlu_shots scores a causal LM"),
        (["task=seq2seq", "eval.metric=blue", "eval.generate=true"], "did you mean 'bleu'"),
    ],
)
def test_bad_generation_settings_are_one_line_errors(capsys, tmp_path, overrides, expected):
    err = cli_err(capsys, "train", *overrides, f"output.dir={tmp_path / 'run'}")
    assert expected in err
    assert not (tmp_path / "run").exists()


def test_causal_lm_run_scores_generations_of_its_prompts(tiny_models, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _copy_rows(40)))
    cfg = load_config(
        None,
        [
            "task=causal_lm",
            f"model.name={tiny_models['llama']}",
            f"data.source={data}",
            "model.max_length=16",
            "train.max_steps=2",
            "train.num_threads=1",
            "methods=[full]",
            "eval.generate=true",
            "eval.max_new_tokens=5",
            "eval.max_generate_samples=3",
            "output.tensorboard=false",
            f"output.dir={tmp_path / 'run'}",
        ],
    )
    summary = run_train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    test_rows = load_raw_splits(cfg.data).test[:3]
    assert [x["source"] for x in lines] == [r["text"] for r in test_rows]
    tok = load_tokenizer(str(tmp_path / "run" / "model"))
    model = load_model(str(tmp_path / "run" / "model"), "causal_lm")
    again = generate_texts(model, tok, [r["text"] for r in test_rows], "causal_lm", 16, 5)
    assert [x["prediction"] for x in lines] == again  # the saved model's continuations, prompts cut off
    rescored = text_metrics(again, [r["label"] for r in test_rows])
    assert rescored == {k: summary["test"][k] for k in rescored}


def test_answer_metrics_score_label_answers_like_a_classifier():
    from leantune.eval.generation import answer_metrics

    refs = ["positive", "negative", "Positive.", "negative", "positive", "negative"]
    preds = ["Positive, because it is fun", "negative", "negativity", "NEGATIVE.", "pos", "negative\nmore"]
    m = answer_metrics(preds, refs)
    # read as: positive, negative, <other>, negative, <other>, negative
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["unmatched_answers"] == pytest.approx(2 / 6)
    assert m["precision"] == pytest.approx((1 + 1) / 2)  # every predicted label was right
    assert m["recall"] == pytest.approx((1 / 3 + 3 / 3) / 2)
    assert m["f1"] == pytest.approx((0.5 + 1.0) / 2)
    assert answer_metrics(["a b", "c d"], ["one sentence", "another sentence"]) == {}  # free text
