"""Chat data (alpaca / sharegpt / messages): assistant-only labels, multi-turn, sources, packing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from leantune.config import DataConfig
from leantune.data.chat import FALLBACK_TEMPLATE, encode_chat
from leantune.data.packing import check_packing, pack
from leantune.data.tasks import IGNORE_INDEX, collate, encode
from leantune.errors import UserError

#: a ChatML-style template (what SmolLM2, Qwen and many others use), written out so tests need no download
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)

TWO_TURNS = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "what is two plus two"},
    {"role": "assistant", "content": "four"},
    {"role": "user", "content": "and three plus three"},
    {"role": "assistant", "content": "six, of course"},
]


@pytest.fixture(scope="module")
def tok(tiny_models):
    from leantune.models.loader import load_tokenizer

    return load_tokenizer(str(tiny_models["llama"]))


def _render_ids(tok, turns, generation_prompt=False) -> list[int]:
    text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
    return tok(text, add_special_tokens=False)["input_ids"]


def expected_labels(tok, turns) -> tuple[list[int], list[int]]:
    """Independently of data/chat.py: tokenise whole renderings of conversation prefixes; the tokens an
    assistant turn adds beyond the prefix rendered with the generation prompt are the learnt ones."""
    ids = _render_ids(tok, turns)
    labels = [IGNORE_INDEX] * len(ids)
    for i, turn in enumerate(turns):
        if turn["role"] == "assistant":
            start, end = len(_render_ids(tok, turns[:i], True)), len(_render_ids(tok, turns[: i + 1]))
            assert ids[:end] == _render_ids(tok, turns[: i + 1])
            labels[start:end] = ids[start:end]
    return ids, labels


@pytest.mark.parametrize("template", ["chatml", "fallback"])
def test_labels_are_exactly_the_assistant_turns(tok, template):
    tok.chat_template = CHATML if template == "chatml" else FALLBACK_TEMPLATE
    (ex,) = encode_chat([{"messages": TWO_TURNS, "_line": 1}], tok, "messages", None, 512, "chat.jsonl")
    ids, labels = expected_labels(tok, TWO_TURNS)
    assert ex["input_ids"] == ids
    assert ex["labels"] == labels
    learnt = tok.decode([t for t in ex["labels"] if t != IGNORE_INDEX])
    masked = tok.decode(
        [t if lab == IGNORE_INDEX else tok.pad_token_id for t, lab in zip(ids, labels, strict=True)]
    )
    # both assistant turns are learnt, no user or system word is
    assert "four" in learnt and "six" in learnt
    assert not any(w in learnt for w in ("two", "three", "briefly", "user", "system"))
    assert "briefly" in masked and "three" in masked
    n_learnt = sum(lab != IGNORE_INDEX for lab in labels)
    if template == "fallback":  # content + [SEP] (the EOS) per assistant turn
        four, six = (len(tok(w, add_special_tokens=False)["input_ids"]) for w in ("four", "six, of course"))
        assert n_learnt == four + 1 + six + 1
    assert 0 < n_learnt < len(ids) / 3


def test_formats_agree(tok):
    tok.chat_template = CHATML
    turns = TWO_TURNS[1:3]
    rows = {
        "messages": {"messages": turns},
        "sharegpt": {
            "conversations": [
                {"from": "human", "value": turns[0]["content"]},
                {"from": "gpt", "value": "four"},
            ]
        },
        "alpaca": {"instruction": "what is two plus two", "input": "", "output": "four"},
    }
    encoded = {fmt: encode_chat([row], tok, fmt, "Be brief.", 512, "x")[0] for fmt, row in rows.items()}
    assert encoded["messages"] == encoded["sharegpt"] == encoded["alpaca"]
    ids, labels = expected_labels(tok, [{"role": "system", "content": "Be brief."}, *turns])
    assert encoded["alpaca"]["input_ids"] == ids and encoded["alpaca"]["labels"] == labels
    # alpaca's input column joins the instruction in the user turn
    with_input = encode_chat(
        [{"instruction": "add", "input": "2 and 2", "output": "4"}], tok, "alpaca", None, 512, "x"
    )[0]
    assert with_input["input_ids"] == _render_ids(
        tok, [{"role": "user", "content": "add\n\n2 and 2"}, {"role": "assistant", "content": "4"}]
    )


def test_too_long_keeps_the_last_assistant_turn(tok):
    tok.chat_template = CHATML
    full = encode_chat([{"messages": TWO_TURNS}], tok, "messages", None, 512, "x")[0]
    cut = encode_chat([{"messages": TWO_TURNS}], tok, "messages", None, 20, "x")[0]
    assert len(cut["input_ids"]) == 20
    assert cut["input_ids"] == full["input_ids"][-20:] and cut["labels"] == full["labels"][-20:]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_and_hf_datasets_sources(tok, tmp_path):
    from leantune.data.tasks import load_raw_splits

    tok.chat_template = CHATML
    rows = [{"messages": TWO_TURNS}, {"messages": TWO_TURNS[1:3]}]
    folder = tmp_path / "hfdata"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", rows)
    out = {}
    for source in (str(folder / "train.jsonl"), f"hf:{folder}"):
        cfg = DataConfig(source=source, format="messages", validation_fraction=0.0, test_fraction=0.0)
        raw = load_raw_splits(cfg)
        out[source] = encode("causal_lm", raw.train, tok, cfg, 512, None, source)
    a, b = out.values()
    assert [e["input_ids"] for e in a] == [e["input_ids"] for e in b]
    assert [e["labels"] for e in a] == [e["labels"] for e in b]
    assert a[1]["input_ids"] == expected_labels(tok, TWO_TURNS[1:3])[0]


@pytest.mark.parametrize(
    ("fmt", "row", "phrase"),
    [
        ("messages", {"text": "hi"}, "line 3: record has no 'messages'"),
        ("alpaca", {"instruction": "hi"}, "line 3: record has no 'output'"),
        ("sharegpt", {"conversations": []}, "line 3: empty conversation"),
        ("messages", {"messages": [{"role": "bot", "content": "x"}]}, "turn 0 has unknown role 'bot'"),
        ("sharegpt", {"conversations": [{"from": "human", "value": "x"}]}, "has no assistant turn"),
        ("messages", {"messages": [{"role": "user"}]}, "turn 0 has no 'content'"),
        ("messages", {"messages": "hello"}, "'messages' is a str, not a list"),
    ],
)
def test_bad_records_name_their_line(tok, fmt, row, phrase):
    tok.chat_template = CHATML
    with pytest.raises(UserError, match=phrase.replace("(", r"\(")):
        encode_chat([{**row, "_line": 3}], tok, fmt, None, 64, "chat.jsonl")


def test_template_that_rejects_a_role(tok):
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
        "supported') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(UserError, match="line 4: the chat template rejects this conversation: System role"):
        encode_chat([{"messages": TWO_TURNS, "_line": 4}], tok, "messages", None, 64, "chat.jsonl")


def _per_token_loss_sum(model, features, pad_id) -> tuple[float, int]:
    batch = collate(features, pad_id)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
    )
    return float(loss), int((labels != IGNORE_INDEX).sum())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_loss_equals_unpacked_loss(tiny_models, tok, arch):
    from leantune.models.loader import load_model

    tok.chat_template = CHATML
    model = load_model(str(tiny_models[arch]), "causal_lm").eval()
    rows = [{"messages": TWO_TURNS[1 : 3 + 2 * (i % 2)]} for i in range(7)]
    features = encode_chat(rows, tok, "messages", None, 128, "x")
    packed = pack(features, 128)
    assert [len(r["input_ids"]) for r in packed] == [110, 110, 110, 36]  # 2 + 2 + 2 + 1 examples
    assert len(packed) < len(features)  # it did pack
    assert sum(len(r["input_ids"]) for r in packed) == sum(len(f["input_ids"]) for f in features)
    alone = [_per_token_loss_sum(model, [f], tok.pad_token_id) for f in features]
    together = _per_token_loss_sum(model, packed, tok.pad_token_id)
    unpacked_mean = sum(s for s, _ in alone) / sum(n for _, n in alone)
    assert together[1] == sum(n for _, n in alone)  # the same target tokens
    assert abs(together[0] / together[1] - unpacked_mean) < 1e-5
    # and the model's own loss (mean over the batch's target tokens) agrees too
    batch = collate(packed, tok.pad_token_id)
    with torch.no_grad():
        hf_loss = float(model(**batch).loss)
    assert abs(hf_loss - unpacked_mean) < 1e-5
    check_packing(model, len(tok), arch)  # the probe passes on a model that honours the mask


def test_packing_refused_for_a_model_that_ignores_positions(tiny_models):
    from leantune.models.loader import load_model

    model = load_model(str(tiny_models["gpt2"]), "causal_lm")
    plain = model.forward

    def forward(input_ids=None, attention_mask=None, position_ids=None, **kw):  # drops mask and positions
        return plain(input_ids=input_ids, **kw)

    model.forward = forward
    with pytest.raises(UserError, match="does not honour a packed 4-D attention mask"):
        check_packing(model, 100, "fake")


def test_chat_run_trains_packed(tiny_models, tmp_path):
    """A messages run with packing on the tiny Llama (fallback template): trains, saves the template."""
    from leantune.config import load_config
    from leantune.recipes.train import run_train

    rows = [{"messages": TWO_TURNS[: 3 + 2 * (i % 2)]} for i in range(40)]
    data = _write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = load_config(
        None,
        [
            "task=causal_lm",
            f"model.name={tiny_models['llama']}",
            "model.max_length=128",
            f"data.source={data}",
            "data.format=messages",
            "data.packing=true",
            "train.batch_size=4",
            "train.max_steps=3",
            "train.num_threads=1",
            "train.save_every=null",
            "output.tensorboard=false",
            f"output.dir={tmp_path / 'run'}",
        ],
    )
    summary = run_train(cfg)
    assert summary["data"]["train"] < 32  # packed rows, fewer than the 32 training conversations
    assert summary["data"]["validation"] == 4
    saved = json.loads((tmp_path / "run" / "model" / "tokenizer_config.json").read_text())
    template = saved.get("chat_template") or (tmp_path / "run" / "model" / "chat_template.jinja").read_text()
    assert template == FALLBACK_TEMPLATE


@pytest.mark.slow
def test_smollm2_template_masks_assistant_turns():
    """The real chat model's ChatML template and BPE tokenizer obey the same masking rule."""
    from leantune.models.loader import load_tokenizer

    tok = load_tokenizer("embedded:smollm2")
    assert tok.chat_template
    (ex,) = encode_chat([{"messages": TWO_TURNS}], tok, "messages", None, 512, "x")
    ids, labels = expected_labels(tok, TWO_TURNS)
    assert ex["input_ids"] == ids and ex["labels"] == labels
    learnt = tok.decode([t for t in labels if t != IGNORE_INDEX])
    assert learnt == "four<|im_end|>\nsix, of course<|im_end|>\n"
