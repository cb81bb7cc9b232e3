"""Task prompt_classification: templates and label words are checked, the label-word head returns the LM
head's logits of the label words at the scored position (causal and masked LMs, with and without
`logits_to_keep`), evaluation reports classification metrics, and MeZO learns the toy task through the
trainer (the reason the task exists)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from leantune.config import load_config
from leantune.data.prompts import check_template, encode_prompts, label_word_ids
from leantune.data.tasks import collate
from leantune.errors import UserError
from leantune.models.loader import load_tokenizer
from leantune.models.prompt_head import attach_label_words
from leantune.settings import DataConfig
from tests.conftest import ci_only

WORDS = "data.label_words=[terrible,great]"


@pytest.mark.parametrize(
    ("template", "pair", "needle"),
    [
        ("{text} It was", False, "{mask} exactly once"),
        ("{text} {mask} {mask}", False, "{mask} exactly once"),
        ("It was {mask}", False, "{text} exactly once"),
        ("{text} {foo} {mask}", False, "unknown placeholder {foo}"),
        ("{text} {mask}", True, "{text_pair}"),
        ("{text} {text_pair} {mask}", False, "{text_pair}"),
    ],
)
def test_bad_templates_are_refused(template, pair, needle):
    with pytest.raises(ValueError, match=needle.replace("{", r"\{").replace("}", r"\}")):
        check_template(template, pair)
    check_template("{text} ? {mask} , {text_pair}" if pair else "{text} It was {mask}", pair)


def test_label_words_are_one_token_or_the_first_one_said(tiny_models):
    tok = load_tokenizer(str(tiny_models["gpt2"]))
    ids, notes = label_word_ids(tok, DataConfig(label_words=["terrible", "great"]), ["neg", "pos"])
    assert ids == tok.convert_tokens_to_ids(["terrible", "great"]) and notes == []
    multi = DataConfig(label_words=["terrible", "zzyzxqwv"])
    with pytest.raises(UserError, match="one-token word"):
        label_word_ids(tok, multi, ["neg", "pos"])
    first = multi.model_copy(update={"label_word_tokens": "first"})
    ids, notes = label_word_ids(tok, first, ["neg", "pos"])
    assert ids[1] == tok(" zzyzxqwv", add_special_tokens=False)["input_ids"][0]
    assert len(notes) == 1 and "zzyzxqwv" in notes[0] and "first" in notes[0]
    with pytest.raises(UserError, match="share a first token"):
        label_word_ids(tok, first.model_copy(update={"label_words": ["zzyzx", "zzyzxqwv"]}), ["a", "b"])


def _features(tok, kind: str, texts: list[str], template: str = "{text} It was {mask}") -> list[dict]:
    cfg = DataConfig(template=template, label_words=["terrible", "great"])
    return encode_prompts(
        [{}] * len(texts), tok, cfg, 24, [i % 2 for i in range(len(texts))], texts, None, kind
    )


def test_causal_prompt_ends_at_the_scored_token_and_long_text_loses_its_end(tiny_models):
    tok = load_tokenizer(str(tiny_models["gpt2"]))
    short, long = _features(tok, "causal", ["a dull film", "a dull film " + "and so on " * 30])
    assert tok.decode(short["input_ids"]) == "a dull film it was"  # BERT vocabulary lower-cases
    assert short["label_position"] == len(short["input_ids"]) - 1
    assert len(long["input_ids"]) <= 24 and tok.decode(long["input_ids"][-2:]) == "it was"
    assert long["label_position"] == len(long["input_ids"]) - 1


def _reference_scores(lm, batch, words: list[int]) -> torch.Tensor:
    """The label words' logits read straight off the whole (batch, length, vocab) logits."""
    with torch.no_grad():
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    rows = torch.arange(len(logits))
    return logits[rows, batch["label_position"]][:, words]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_the_head_scores_the_label_words_at_the_slot(tiny_models, tmp_path, arch):
    """Hook output == the words' logits read off the full logits; the loss is their cross-entropy.
    (llama and gpt2 take the logits_to_keep path; the masked BERT reads the [MASK] position.)"""
    import transformers

    tok = load_tokenizer(str(tiny_models["bert" if arch == "bert" else arch]))
    if arch == "bert":  # a masked LM: the tiny BERT's encoder with an MLM head
        torch.manual_seed(0)
        lm = transformers.BertForMaskedLM(transformers.BertConfig.from_pretrained(tiny_models["bert"]))
        kind = "masked"
    else:
        lm = transformers.AutoModelForCausalLM.from_pretrained(tiny_models[arch])
        kind = "causal"
    lm.eval()
    feats = _features(tok, kind, ["a dull film", "what a great and moving story it was", "fine"])
    batch = collate(feats, tok.pad_token_id)
    if kind == "masked":
        assert all(f["input_ids"][f["label_position"]] == tok.mask_token_id for f in feats)
    words = tok.convert_tokens_to_ids(["terrible", "great"])
    expected = _reference_scores(lm, batch, words)
    attach_label_words(lm, words, kind)
    assert lm.__dict__["_leantune_keep"] == (kind == "causal")
    with torch.no_grad():
        out = lm(**batch)
    assert out.logits.shape == (3, 2)
    torch.testing.assert_close(out.logits, expected.float(), rtol=1e-5, atol=1e-5)
    ce = torch.nn.functional.cross_entropy(expected.float(), batch["labels"])
    assert abs(float(out.loss) - float(ce)) < 1e-5
    plain = lm(input_ids=batch["input_ids"])  # a batch without label_position is an ordinary forward
    assert plain.logits.ndim == 3


def _run(model: Path, data: Path, out: Path, *extra: str) -> dict:
    from leantune.recipes.train import run_train

    overrides = [
        f"model.name={model}",
        "task=prompt_classification",
        WORDS,
        "model.max_length=16",
        f"data.source={data}",
        "train.batch_size=16",
        "train.num_threads=1",
        "train.save_every=null",
        "train.warmup_ratio=0",
        "output.tensorboard=false",
        f"output.dir={out}",
        *extra,
    ]
    return run_train(load_config(None, overrides))


@pytest.fixture(scope="module")
def pretrained_llama(tiny_models, tmp_path_factory) -> Path:
    """The tiny Llama after a short causal-LM pretraining on sentences that end "it was great" or "it was
    terrible" after a positive or negative word (other rows than the task's): an LM with a weak prior
    for the label words, which is what MeZO fine-tunes from (a random LM has none)."""
    from leantune.recipes.train import run_train
    from tests.conftest import make_sentiment_rows, write_csv

    root = tmp_path_factory.mktemp("pretrain")
    rows = [
        {"text": f"{r['text']} it was {'great' if r['label'] == 'pos' else 'terrible'}"}
        for r in make_sentiment_rows(640, seed=7)
    ]
    overrides = [
        f"model.name={tiny_models['llama']}",
        "task=causal_lm",
        "data.label_column=null",
        f"data.source={write_csv(root / 'lm.csv', rows)}",
        "model.max_length=16",
        "methods=[full]",
        "train.lr=3e-3",
        "train.max_steps=150",
        "train.epochs=100",
        "train.batch_size=16",
        "train.num_threads=1",
        "train.save_every=null",
        "output.tensorboard=false",
        f"output.dir={root / 'run'}",
    ]
    run_train(load_config(None, overrides))
    return root / "run" / "model"


@pytest.mark.slow  # ~60 s on 2 shared cores: a 150-step pretraining, then 200 MeZO steps
@ci_only
def test_mezo_learns_prompt_classification_through_the_trainer(pretrained_llama, sentiment_csv, tmp_path):
    """Full-parameter MeZO from the pretrained tiny LM: the test loss falls below the zero-shot loss
    (the same run with a vanishing lr) and the accuracy beats the majority class."""
    common = ["methods=[mezo]", "train.max_grad_norm=null", "train.epochs=100"]
    zero = _run(
        pretrained_llama, sentiment_csv, tmp_path / "zero", *common, "train.lr=1e-12", "train.max_steps=1"
    )
    tuned = _run(
        pretrained_llama, sentiment_csv, tmp_path / "mezo", *common, "train.lr=1e-3", "train.max_steps=200"
    )
    assert tuned["method_reports"]["mezo"]["forward_passes"] == 400
    assert tuned["test"]["loss"] < zero["test"]["loss"] - 0.005
    assert tuned["test"]["accuracy"] >= tuned["test"]["majority_accuracy"] + 0.1
    assert set(tuned["test"]) >= {"accuracy", "f1", "precision", "recall"}


@pytest.mark.slow  # two training runs of ~15 s each on 2 shared cores
@pytest.mark.parametrize("methods", ["[full]", "[lora]"])
def test_backprop_learns_it_and_eval_rescores_the_saved_run(tiny_models, sentiment_csv, tmp_path, methods):
    """Any method can use the task: backprop (full, LoRA) on the tiny Llama beats the majority class,
    and `leantune eval` on the saved run (the plain LM, the label-word head re-attached) gives the
    run's own test numbers."""
    from leantune.recipes.evaluate import run_eval

    lr = "3e-3" if methods == "[full]" else "1e-2"
    summary = _run(
        tiny_models["llama"],
        sentiment_csv,
        tmp_path / "run",
        f"methods={methods}",
        f"train.lr={lr}",
        "train.epochs=3",
    )
    test = summary["test"]
    assert test["accuracy"] >= test["majority_accuracy"] + 0.15
    assert summary["prompt_head"]["label_tokens"] == ["terrible", "great"]
    again = run_eval(tmp_path / "run", None)
    assert again["accuracy"] == test["accuracy"] and abs(again["loss"] - test["loss"]) < 1e-5


@pytest.mark.slow  # ~45 s on 2 shared cores
def test_a_masked_lm_with_its_head_trains_through_the_trainer(tiny_models, sentiment_csv, tmp_path):
    """A BERT saved with its MLM head is scored at [MASK] (kind masked), moves off the majority class with
    full backprop (0.656 vs 0.594 on 2026-12-04: a random tiny MLM head learns this slowly), and the
    template's text after {mask} is allowed for it."""
    import transformers

    torch.manual_seed(0)
    folder = tmp_path / "mlm"
    transformers.BertForMaskedLM(
        transformers.BertConfig.from_pretrained(tiny_models["bert"])
    ).save_pretrained(folder)
    load_tokenizer(str(tiny_models["bert"])).save_pretrained(folder)
    summary = _run(
        folder,
        sentiment_csv,
        tmp_path / "run",
        "methods=[full]",
        "train.lr=3e-3",
        "train.epochs=3",
        "data.template='{text} It was {mask} .'",
    )
    assert summary["prompt_head"]["kind"] == "masked"
    assert summary["test"]["accuracy"] > summary["test"]["majority_accuracy"] + 0.03


def test_plan_works_for_the_prompt_task(tiny_models, sentiment_csv):
    """`leantune plan` probes with the label-word head attached and plans LoRA on the LM; the
    full-parameter line puts MeZO far below AdamW."""
    from leantune.recipes.plan import make_plan

    cfg = load_config(
        None,
        [
            f"model.name={tiny_models['llama']}",
            "task=prompt_classification",
            WORDS,
            "model.max_length=16",
            f"data.source={sentiment_csv}",
            "train.batch_size=16",
            "train.num_threads=1",
        ],
    )
    plan = make_plan(cfg, "200MiB")
    peaks = plan["full_parameter"]["peak_bytes"]
    assert plan["estimate"]["total"] <= 200 * 2**20 and peaks["mezo"] < 0.5 * peaks["adamw"]


def test_predict_labels_a_prompt_run_as_eval_scores_it(tiny_models, sentiment_csv, tmp_path):
    """`leantune predict` on a prompt_classification run: each label is the arg-max of the label words'
    logits read straight off the LM's full logits at the scored slot, the probabilities their softmax,
    and the accuracy of the written labels is the one `leantune eval` reports on the same file."""
    import csv

    from leantune.data.tasks import encode
    from leantune.recipes.common import load_run_config, load_trained_model
    from leantune.recipes.evaluate import run_eval
    from leantune.recipes.predict import run_predict
    from tests.conftest import make_sentiment_rows, write_csv

    run = tmp_path / "run"
    _run(
        tiny_models["llama"],
        sentiment_csv,
        run,
        "methods=[full]",
        "train.lr=3e-3",
        "train.epochs=1",
        "eval.batch_size=32",
    )
    held_out = write_csv(tmp_path / "held_out.csv", make_sentiment_rows(80, seed=5))
    out = tmp_path / "predictions.csv"
    result = run_predict(run, held_out, out)
    with out.open() as fh:
        written = list(csv.DictReader(fh))
    assert set(written[0]) == {"text", "label", "prediction", "prob_neg", "prob_pos"}
    cfg = load_run_config(run)
    tok = load_tokenizer(str(run / "model"))
    rows = [{"text": r["text"], "label": r["label"]} for r in written]
    feats = encode(cfg.task, rows, tok, cfg.data, 16, cfg.data.label_names, "held_out", "causal")
    model = load_trained_model(run, cfg).eval()
    words = tok.convert_tokens_to_ids(["terrible", "great"])
    scores = torch.cat(
        [_reference_scores(model, collate(feats[i : i + 32], tok.pad_token_id), words) for i in (0, 32, 64)]
    )
    names = cfg.data.label_names
    assert [r["prediction"] for r in written] == [names[i] for i in scores.argmax(-1).tolist()]
    probs = torch.softmax(scores.float(), -1)
    assert max(abs(float(r["prob_pos"]) - float(p[1])) for r, p in zip(written, probs, strict=True)) < 1e-5
    accuracy = sum(r["prediction"] == r["label"] for r in written) / len(written)
    evaluated = run_eval(run, str(held_out))
    assert result["accuracy"] == accuracy == pytest.approx(evaluated["accuracy"], abs=1e-12)
    assert len({r["prediction"] for r in written}) == 2  # not one class for every row: the test can fail
