"""Chat data: alpaca / sharegpt / messages records -> conversations -> tokens with assistant-only labels.

A record becomes a list of `{role, content}` turns (roles system, user, assistant), rendered with the
tokenizer's chat template (`apply_chat_template`). The masking rule: a token is in the loss exactly when
it lies in an assistant turn's *own* text, i.e. between the end of the conversation so far rendered with
the generation prompt (`render(turns[:i], add_generation_prompt=True)`) and the end of
`render(turns[:i + 1])`. That is the assistant's content plus whatever the template closes the turn with
(an end-of-turn token such as `<|im_end|>`, so the model learns to stop); system and user turns, the
template's role headers and the generation prompt are masked (-100). Every assistant turn of a
multi-turn conversation is in the loss.

The rendered text is cut at those boundaries and each piece is tokenised on its own (no special tokens
added: templates write their own), so a label never straddles a boundary and the prompt of a first
assistant turn is tokenised exactly as `leantune generate` tokenises a prompt. A template whose rendering
of a prefix of the conversation is not a prefix of the whole (it rewrites earlier turns) cannot be
masked this way and is refused in one line.

A tokenizer without a chat template gets `FALLBACK_TEMPLATE` (plain-text `### User:` headers, the
assistant turn ended by the EOS token); the run saves it with its tokenizer, so `generate` uses the same.
"""

from __future__ import annotations

from leantune.data.sources import Record
from leantune.errors import UserError

IGNORE_INDEX = -100
FORMATS = ("alpaca", "sharegpt", "messages")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}

#: used when the tokenizer has no chat template of its own (documented in docs/chat.md)
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{{ '### ' + message['role'] | capitalize + ':\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\\n\\n' }}{% endif %}{{ '### Assistant:\\n' }}"
    "{% endif %}"
)


def ensure_chat_template(tok) -> None:
    """Give a tokenizer without a chat template the documented fallback (in place; saved with the run)."""
    if not getattr(tok, "chat_template", None):
        tok.chat_template = FALLBACK_TEMPLATE


def _where(row: Record, source: str) -> str:
    return f"{source} line {row.get('_line', '?')}"


def _field(row: Record, key: str, fmt: str, where: str, shape: str):
    if key not in row or row[key] is None:
        present = ", ".join(k for k in row if k != "_line") or "none"
        raise UserError(
            f"{where}: record has no '{key}' (data.format={fmt} needs {shape}; it has: {present})"
        )
    return row[key]


def _content(value, where: str, i: int, role: str, key: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: turn {i} ({role}) has a {type(value).__name__} '{key}', not text")
    if role != "system" and not value.strip():
        raise UserError(f"{where}: turn {i} ({role}) has empty '{key}'; fill it in or drop the record")
    return value


def _turns(row: Record, fmt: str, where: str) -> list[dict]:
    if fmt == "alpaca":
        shape = "instruction, output and optionally input columns"
        instruction = _field(row, "instruction", fmt, where, shape)
        output = _field(row, "output", fmt, where, shape)
        extra = row.get("input")
        user = _content(instruction, where, 0, "user", "instruction")
        if isinstance(extra, str) and extra.strip():
            user = f"{user}\n\n{extra}"
        return [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _content(output, where, 1, "assistant", "output")},
        ]
    if fmt == "sharegpt":
        key, role_key, text_key, mapping = "conversations", "from", "value", SHAREGPT_ROLES
        shape = "conversations: [{from: human|gpt|system, value}]"
    else:
        key, role_key, text_key, mapping = "messages", "role", "content", {r: r for r in ROLES}
        shape = "messages: [{role: system|user|assistant, content}]"
    turns = _field(row, key, fmt, where, shape)
    if not isinstance(turns, list):
        raise UserError(
            f"{where}: '{key}' is a {type(turns).__name__}, not a list of turns ({shape}); "
            "use JSONL or a datasets source"
        )
    if not turns:
        raise UserError(f"{where}: empty conversation ('{key}' has no turns); drop the record")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise UserError(f"{where}: turn {i} is a {type(turn).__name__}, not an object ({shape})")
        for k in (role_key, text_key):
            if k not in turn:
                raise UserError(f"{where}: turn {i} has no '{k}' ({shape})")
        role = turn[role_key]
        if role not in mapping:
            raise UserError(f"{where}: turn {i} has unknown role {role!r}; use one of {', '.join(mapping)}")
        role = mapping[role]
        out.append({"role": role, "content": _content(turn[text_key], where, i, role, text_key)})
    if not any(t["role"] == "assistant" for t in out):
        raise UserError(f"{where}: the conversation has no assistant turn (nothing to learn); drop it")
    return out


def conversation(row: Record, fmt: str, system_prompt: str | None, source: str) -> list[dict]:
    """The turns of one record in `fmt`, with `system_prompt` first where the record has no system turn."""
    turns = _turns(row, fmt, _where(row, source))
    if system_prompt and turns[0]["role"] != "system":
        turns = [{"role": "system", "content": system_prompt}, *turns]
    return turns


def render(tok, turns: list[dict], generation_prompt: bool = False, where: str = "") -> str:
    """The template's text for `turns`; a template that refuses them is one line naming the record."""
    try:
        return tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja2's TemplateError from raise_exception, or any template bug
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{where}: the chat template rejects this conversation: {first}") from None


def masked_segments(tok, turns: list[dict], where: str) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, in_loss) pieces by the masking rule (module doc)."""
    full = render(tok, turns, where=where)
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before = render(tok, turns[:i], generation_prompt=True, where=where)
        through = render(tok, turns[: i + 1], where=where)
        if not (full.startswith(before) and full.startswith(through) and pos <= len(before) <= len(through)):
            raise UserError(
                f"{where}: the chat template does not render this conversation turn by turn (the text "
                f"up to assistant turn {i} is not a prefix of the whole), so its assistant tokens cannot be "
                "masked; "
                "use another template or data.format=text"
            )
        pieces += [(full[pos : len(before)], False), (full[len(before) : len(through)], True)]
        pos = len(through)
    pieces.append((full[pos:], False))
    return [(text, loss) for text, loss in pieces if text]


def encode_chat(rows: list[Record], tok, fmt: str, system_prompt: str | None, max_length: int, source: str):
    """Tokenised chat examples: input_ids, attention_mask and labels (-100 outside assistant turns).

    Too long, a conversation loses its trailing masked tokens (nothing to learn there) and then its
    *start*, so the last assistant turn is always learnt (as causal-LM prompts lose their start).
    """
    ensure_chat_template(tok)
    out = []
    for row in rows:
        where = _where(row, source)
        ids: list[int] = []
        labels: list[int] = []
        for text, in_loss in masked_segments(tok, conversation(row, fmt, system_prompt, source), where):
            piece = tok(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if in_loss else [IGNORE_INDEX] * len(piece)
        last = max((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), default=-1)
        if last < 0:
            raise UserError(f"{where}: the assistant turns render to no tokens; check the template")
        ids, labels = ids[: last + 1][-max_length:], labels[: last + 1][-max_length:]
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return out


def chat_prompt_ids(tok, prompt: str | list[dict], system_prompt: str | None = None) -> list[int]:
    """The tokens `generate` continues: a user message (or a list of turns) rendered with the generation
    prompt, tokenised as in training."""
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and turns[0]["role"] != "system":
        turns = [{"role": "system", "content": system_prompt}, *turns]
    ensure_chat_template(tok)
    text = render(tok, turns, generation_prompt=True, where="prompt")
    return tok(text, add_special_tokens=False)["input_ids"]
