"""Chat data (data.format alpaca / sharegpt / messages), packing, `generate` and `predict`: each bad record
is named by its line; contradicting settings and bad options are one line before anything is written."""

from __future__ import annotations

import json

from tests.bad_input.harness import DATA_CSV, Case, Env, train, with_data

GOOD = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "say red"},
        {"role": "assistant", "content": "red"},
    ]
}
BAD_LINE = 4


def chat_file(bad: dict, good: dict = GOOD, n: int = 40) -> str:
    rows = [good] * n
    rows[BAD_LINE - 1] = bad
    return "".join(json.dumps(r) + "\n" for r in rows)


CHAT = ("task=causal_lm", "model.name=@GPT2@", "data.source=chat.jsonl")
ALPACA_GOOD = {"instruction": "say red", "input": "", "output": "red"}
SHAREGPT_GOOD = {"conversations": [{"from": "human", "value": "say red"}, {"from": "gpt", "value": "red"}]}

# id, what, format, good record, bad record, phrase
RECORDS = [
    (
        "messages-missing",
        "a messages record without `messages`",
        "messages",
        GOOD,
        {"text": "hello"},
        f"line {BAD_LINE}: record has no 'messages'",
    ),
    (
        "alpaca-missing-output",
        "an alpaca record without `output`",
        "alpaca",
        ALPACA_GOOD,
        {"instruction": "say red"},
        f"line {BAD_LINE}: record has no 'output'",
    ),
    (
        "sharegpt-empty",
        "a sharegpt record with an empty conversation",
        "sharegpt",
        SHAREGPT_GOOD,
        {"conversations": []},
        f"line {BAD_LINE}: empty conversation",
    ),
    (
        "sharegpt-unknown-role",
        "a sharegpt turn from an unknown role ('bot')",
        "sharegpt",
        SHAREGPT_GOOD,
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "hi"}]},
        "turn 1 has unknown role 'bot'",
    ),
    (
        "messages-unknown-role",
        "a messages turn with role 'tool'",
        "messages",
        GOOD,
        {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]},
        "turn 1 has unknown role 'tool'",
    ),
    (
        "messages-no-assistant",
        "a conversation without an assistant turn",
        "messages",
        GOOD,
        {"messages": [{"role": "user", "content": "hi"}]},
        f"line {BAD_LINE}: the conversation has no assistant turn",
    ),
    (
        "messages-no-content",
        "a turn without `content`",
        "messages",
        GOOD,
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
        "turn 0 has no 'content'",
    ),
    (
        "messages-empty-answer",
        "an assistant turn of spaces",
        "messages",
        GOOD,
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
        "turn 1 (assistant) has empty 'content'",
    ),
    (
        "messages-not-a-list",
        "`messages` as a string",
        "messages",
        GOOD,
        {"messages": "user: hi"},
        "'messages' is a str, not a list of turns",
    ),
]

NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def _model_rejecting_system(env: Env) -> None:
    folder = env.copy_model("gpt2")
    (folder / "chat_template.jinja").write_text(NO_SYSTEM_TEMPLATE)


def _finished_run(env: Env) -> None:
    env.copy_run()


def _cases() -> list[Case]:
    out = [
        Case(
            id=f"chat-{cid}",
            family="chat",
            what=what,
            argv=train(*CHAT, f"data.format={fmt}"),
            phrase=phrase,
            files=with_data({"chat.jsonl": chat_file(bad, good)}),
        )
        for cid, what, fmt, good, bad, phrase in RECORDS
    ]
    out += [
        Case(
            id="chat-template-rejects-role",
            family="chat",
            what="a system turn the model's chat template rejects",
            argv=train(
                "task=causal_lm", "model.name=model", "data.source=chat.jsonl", "data.format=messages"
            ),
            phrase="the chat template rejects this conversation: System role not supported",
            files=with_data({"chat.jsonl": chat_file(GOOD)}),
            setup=_model_rejecting_system,
        ),
        Case(
            id="chat-format-classification",
            family="chat",
            what="data.format=messages on a classification run",
            argv=train("data.format=messages"),
            phrase="data.format=messages is chat data for task causal_lm",
            files=with_data(),
        ),
        Case(
            id="chat-generate-eval",
            family="chat",
            what="eval.generate on chat data",
            argv=train(*CHAT, "data.format=messages", "eval.generate=true"),
            phrase="set eval.generate=false",
            files=with_data({"chat.jsonl": chat_file(GOOD)}),
        ),
        Case(
            id="packing-classification",
            family="chat",
            what="data.packing on a classification run",
            argv=train("data.packing=true"),
            phrase="data.packing packs causal-LM examples",
            files=with_data(),
        ),
        Case(
            id="packing-bf16",
            family="chat",
            what="data.packing with a bfloat16 model",
            argv=train(*CHAT, "data.format=messages", "data.packing=true", "model.dtype=bfloat16"),
            phrase="data.packing builds a float32 attention mask",
            files=with_data({"chat.jsonl": chat_file(GOOD)}),
        ),
        Case(
            id="packing-prefix-cache",
            family="chat",
            what="data.packing with train.cache_frozen_prefix",
            argv=train(*CHAT, "data.packing=true", "train.cache_frozen_prefix=true"),
            phrase="cannot be combined",
            files=with_data({"chat.jsonl": chat_file(GOOD)}),
        ),
        Case(
            id="generate-classification-run",
            family="chat",
            what="generate with a classification run",
            argv=("generate", "run", "hello"),
            phrase="is a classification run; `leantune predict`",
            setup=_finished_run,
        ),
        Case(
            id="generate-no-prompt",
            family="chat",
            what="generate without a prompt or --file",
            argv=("generate", "run"),
            phrase="give a prompt",
            setup=_finished_run,
        ),
        Case(
            id="generate-out-without-file",
            family="chat",
            what="generate --out with a single prompt",
            argv=("generate", "run", "hello", "--out", "g.jsonl"),
            phrase="--out writes the generations of --file",
            setup=_finished_run,
        ),
        Case(
            id="generate-temperature-nan",
            family="chat",
            what="generate --temperature nan",
            argv=("generate", "run", "hello", "--temperature", "nan"),
            phrase="--temperature must be a finite number",
            setup=_finished_run,
        ),
        Case(
            id="generate-top-p-zero",
            family="chat",
            what="generate --top-p 0",
            argv=("generate", "run", "hello", "--top-p", "0"),
            phrase="--top-p must be in (0, 1]",
            setup=_finished_run,
        ),
        Case(
            id="generate-out-exists",
            family="chat",
            what="generate --out onto an existing file",
            argv=("generate", "run", "--file", "p.jsonl", "--out", "g.jsonl"),
            phrase="already exists",
            files={"p.jsonl": '{"prompt": "hi"}\n', "g.jsonl": "keep me\n"},
            setup=_finished_run,
        ),
        Case(
            id="predict-out-exists",
            family="chat",
            what="predict --out onto an existing file",
            argv=("predict", "run", "data.csv", "--out", "p.csv"),
            phrase="already exists",
            files={"data.csv": DATA_CSV, "p.csv": "keep me\n"},
            setup=_finished_run,
        ),
        Case(
            id="predict-out-suffix",
            family="chat",
            what="predict --out with an unknown suffix",
            argv=("predict", "run", "data.csv", "--out", "p.txt"),
            phrase="must end in .csv or .jsonl",
            files={"data.csv": DATA_CSV},
            setup=_finished_run,
        ),
        Case(
            id="predict-missing-column",
            family="chat",
            what="predict on a file without the run's text column",
            argv=("predict", "run", "other.csv", "--out", "p.csv"),
            phrase="column 'text' not found in other.csv",
            files={"other.csv": "sentence,label\nfine film,pos\n"},
            setup=_finished_run,
        ),
        Case(
            id="predict-empty-text",
            family="chat",
            what="predict on a row with an empty text cell",
            argv=("predict", "run", "other.csv", "--out", "p.csv"),
            phrase="other.csv line 3: empty 'text'",
            files={"other.csv": 'text\nfine film\n""\n'},
            setup=_finished_run,
        ),
        Case(
            id="reward-missing-chosen",
            family="chat",
            what="task reward on data without a `chosen` column",
            argv=train("task=reward", "model.name=@GPT2@"),
            phrase="column 'chosen' not found",
            files=with_data(),
        ),
        Case(
            id="reward-metric",
            family="chat",
            what="eval.metric f1 on a reward model",
            argv=train("task=reward", "eval.metric=f1"),
            phrase="eval.metric 'f1' is not a reward metric",
            files=with_data(),
        ),
    ]
    return out


CASES = _cases()
