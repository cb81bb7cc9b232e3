"""MMLU k-shot: the exact prompt format, shots that never leak the question, a rigged model scored exactly,
left-padded batches equal to single prompts, and the `leantune eval --mmlu` / `eval.mmlu_shots` paths."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from leantune.cli import main
from leantune.config import load_config
from leantune.eval.mmlu import (
    PromptEncoder,
    draw_shots,
    format_prompt,
    letter_logprobs,
    mmlu_accuracy,
    select_questions,
)
from leantune.models.loader import load_model, load_tokenizer
from leantune.recipes.train import run_train
from tests.conftest import cli_err

CHOICES = ["alpha", "beta", "gamma", "delta"]


def _records(n: int = 16) -> list[dict]:
    """Question i has answer "ABCD"[i % 4]; two subjects; the number in the text identifies the question."""
    return [
        {
            "question": f"question {i}",
            "choices": CHOICES,
            "answer": "ABCD"[i % 4],
            "subject": "astronomy" if i % 2 else "college_physics",
        }
        for i in range(n)
    ]


def test_prompt_format_one_shot_exact():
    question = {
        "question": "What is 2+2?",
        "choices": ["3", "4", "5", "6"],
        "answer": "B",
        "subject": "elementary_mathematics",
    }
    shot = {"question": "What is 1+1? ", "choices": ["2", "3", "4", "5"], "answer": "A", "subject": "x"}
    assert format_prompt(question, [shot]) == (
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "What is 1+1?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer: A\n\n"
        "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    )


def test_shots_come_from_the_subject_and_never_hold_the_question():
    records = _records(40)
    records[7] = {**records[7], "question": records[3]["question"]}  # a duplicate text, as MMLU has
    by_subject: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_subject.setdefault(r["subject"], []).append(i)
    for i, rec in enumerate(records):
        shots = draw_shots(records, i, 5, seed=0, by_subject=by_subject)
        assert len(shots) == 5
        assert all(s["subject"] == rec["subject"] for s in shots)
        assert all(s["question"] != rec["question"] for s in shots)
        assert shots == draw_shots(records, i, 5, seed=0, by_subject=by_subject)  # seeded
    moved = [
        draw_shots(records, i, 5, 1, by_subject) != draw_shots(records, i, 5, 0, by_subject)
        for i in range(40)
    ]
    assert any(moved)
    few = draw_shots(records[:4], 0, 5, 0, {"college_physics": [0, 2], "astronomy": [1, 3]})
    assert [s["question"] for s in few] == ["question 2"]  # a small subject gives what it has


def test_question_subset_is_seeded_and_subjects_filter():
    records = _records(40)
    subset = select_questions(records, 10, None, seed=3)
    assert len(subset) == 10 == len(set(subset)) and subset == sorted(subset)
    assert subset == select_questions(records, 10, None, seed=3)
    assert subset != select_questions(records, 10, None, seed=4)
    assert all(
        records[i]["subject"] == "astronomy" for i in select_questions(records, None, ["astronomy"], 0)
    )


class RiggedLM(torch.nn.Module):
    """Answers each question with the letter `answers[number]`, read from the last number in its prompt."""

    def __init__(self, tok, answers: dict[int, str], letter_ids: list[int]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=512)
        self.vocab = len(tok)
        self.letter_of = {
            tok.convert_tokens_to_ids(str(n)): letter_ids["ABCD".index(letter)]
            for n, letter in answers.items()
        }

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, **kwargs):
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        for row, ids in enumerate(input_ids.tolist()):
            number = next(t for t in reversed(ids) if t in self.letter_of)  # the asked question comes last
            logits[row, -1, self.letter_of[number]] = 5.0
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("shots", [0, 3])
def test_rigged_model_is_scored_exactly(tiny_models, shots):
    tok = load_tokenizer(str(tiny_models["gpt2"]))
    records = _records(16)
    # right for questions 0..11, wrong for 12..15 (two of them college_physics, two astronomy)
    answers = {i: records[i]["answer"] if i < 12 else "ABCD"[(i + 1) % 4] for i in range(16)}
    model = RiggedLM(tok, answers, PromptEncoder(tok).letter_ids)
    result = mmlu_accuracy(model, tok, records, shots, batch_size=5)
    assert result["n"] == 16 and result["shots"] == shots
    assert result["accuracy"] == 12 / 16
    assert result["per_subject"] == {
        "astronomy": {"accuracy": 6 / 8, "n": 8},
        "college_physics": {"accuracy": 6 / 8, "n": 8},
    }
    assert result["predictions"] == {str(i): answers[i] for i in range(16)}
    assert result["questions_with_fewer_shots"] == 0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_letter_scores_equal_single_prompts(tiny_models, arch):
    torch.set_num_threads(1)
    tok = load_tokenizer(str(tiny_models[arch]))
    model = load_model(str(tiny_models[arch]), "causal_lm", pad_token_id=tok.pad_token_id)
    encode = PromptEncoder(tok)
    records = _records(12)
    prompts = [
        encode(format_prompt(r, records[:k])) for k, r in zip([0, 1, 2, 0, 3], records[5:], strict=False)
    ]
    assert len({len(p) for p in prompts}) > 1  # the batch really needs padding
    batched = torch.tensor(letter_logprobs(model, prompts, encode.letter_ids, tok.pad_token_id, batch_size=5))
    for prompt, row in zip(prompts, batched, strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
        direct = torch.log_softmax(logits, -1)[encode.letter_ids]
        assert torch.allclose(row, direct, atol=1e-4), (row, direct)


def test_long_prompts_lose_shots_to_fit_the_model(tiny_models):
    tok = load_tokenizer(str(tiny_models["gpt2"]))
    model = load_model(str(tiny_models["gpt2"]), "causal_lm", pad_token_id=tok.pad_token_id)
    records = [{**r, "question": r["question"] + " " + "word " * 20} for r in _records(12)]
    result = mmlu_accuracy(model, tok, records, 5)  # 5 shots of ~40 tokens exceed 128 positions
    assert result["n"] == 12
    assert result["questions_with_fewer_shots"] == 12


# --- the command line and the training knob -----------------------------------------------------------


@pytest.fixture
def fake_mmlu(monkeypatch):
    """Stands in for the built-in MMLU data set (leantune.data.builtin.mmlu_records, fetched on first use)."""
    records = _records(24)
    monkeypatch.setattr("leantune.data.builtin.mmlu_records", lambda: records, raising=False)
    return records


def test_eval_mmlu_on_a_base_model(fake_mmlu, tiny_models, tmp_path, capsys):
    out = tmp_path / "mmlu.json"
    argv = ["eval", "--model", str(tiny_models["llama"]), "--mmlu", "2", "--mmlu-questions", "10"]
    assert main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 10 and result["shots"] == 2
    right = sum(fake_mmlu[int(i)]["answer"] == letter for i, letter in result["predictions"].items())
    assert result["accuracy"] == right / 10
    assert sum(s["n"] for s in result["per_subject"].values()) == 10
    assert "MMLU 2-shot" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["eval", "--mmlu", "1"], "exactly one"),
        (["eval", "--model", "m"], "--model is for --mmlu"),
        (["eval", "--model", "m", "--mmlu", "-1"], "0 or more"),
        (["eval", "--model", "m", "--mmlu", "0", "--data", "x.csv"], "drop --data"),
        (["eval", "run", "--mmlu-questions", "5"], "need --mmlu K"),
        (["eval", "--model", "m", "--mmlu", "1", "--mmlu-subjects", "astronmy"], "did you mean 'astronomy'"),
    ],
)
def test_eval_mmlu_errors_are_one_line(fake_mmlu, capsys, argv, expected):
    assert expected in cli_err(capsys, *argv)


def test_training_knob_scores_the_trained_model(fake_mmlu, tiny_models, tmp_path, capsys):
    rows = [{"text": f"question {i}", "label": "ABCD"[i % 4]} for i in range(32)]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_train(
        load_config(
            None,
            [
                "task=causal_lm",
                f"model.name={tiny_models['gpt2']}",
                f"data.source={data}",
                "model.max_length=16",
                "train.max_steps=3",
                "train.num_threads=1",
                "methods=[full]",
                "eval.mmlu_shots=1",
                "eval.mmlu_questions=8",
                "output.tensorboard=false",
                f"output.dir={tmp_path / 'run'}",
            ],
        )
    )
    assert summary["mmlu"]["n"] == 8 and summary["mmlu"]["shots"] == 1
    again = tmp_path / "again.json"
    assert (
        main(["eval", str(tmp_path / "run"), "--mmlu", "1", "--mmlu-questions", "8", "--out", str(again)])
        == 0
    )
    assert json.loads(again.read_text())["accuracy"] == summary["mmlu"]["accuracy"]
    assert "MMLU 1-shot accuracy" in capsys.readouterr().out


def test_mmlu_of_a_classification_run_is_refused(fake_mmlu, base_overrides, capsys):
    run_train(load_config(None, [*base_overrides, "train.max_steps=1"]))
    capsys.readouterr()  # the progress bar
    run_dir = next(o.split("=", 1)[1] for o in base_overrides if o.startswith("output.dir="))
    assert "is a classification run" in cli_err(capsys, "eval", run_dir, "--mmlu", "0")
