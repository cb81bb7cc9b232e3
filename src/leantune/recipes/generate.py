"""`leantune generate RUN_DIR "prompt"` / `--file prompts.jsonl [--out generations.jsonl]`.

Text from a finished causal-LM (or seq2seq) run, adapter or full: greedy by default, sampled with
`--temperature` / `--top-p` (seeded by `--seed`). A run trained on chat data (`data.format` alpaca,
sharegpt or messages) wraps each prompt in its chat template with the generation prompt, exactly as its
training examples were rendered (data/chat.py), with the run's `data.system_prompt`; other runs
tokenise the prompt as their training prompts were. Everything that can be wrong with the input is
checked before the model loads; `--out` is written atomically and never overwrites a file.

prompts.jsonl holds one object per line: `{"prompt": "..."}`, or for chat runs also
`{"messages": [{role, content}, ...]}` (a conversation to continue). Other keys are kept in the output.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from leantune.errors import UserError
from leantune.outputs import check_new_file
from leantune.recipes.common import load_run_config, load_trained_model, setup_torch


def read_prompts(path: Path, chat: bool) -> list[dict]:
    """The records of a prompts file, each with `prompt` text or (chat runs) a `messages` list."""
    from leantune.data.chat import ROLES
    from leantune.data.sources import read_table

    if path.suffix != ".jsonl":
        raise UserError(f'--file {path} must be a .jsonl file of {{"prompt": ...}} objects')
    rows = read_table(path)
    if not rows:
        raise UserError(f"--file {path} holds no prompts; write one JSON object per line")
    for row in rows:
        where = f"{path} line {row['_line']}"
        if "messages" in row and chat:
            turns = row["messages"]
            ok = (
                isinstance(turns, list)
                and turns
                and all(
                    isinstance(t, dict) and t.get("role") in ROLES and isinstance(t.get("content"), str)
                    for t in turns
                )
            )
            if not ok:
                raise UserError(
                    f"{where}: 'messages' must be a non-empty list of {{role: system|user|assistant, "
                    "content}} turns"
                )
            continue
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            need = "'prompt' (text) or 'messages'" if chat else "'prompt' (text)"
            raise UserError(f'{where}: no {need}; write {{"prompt": "..."}}')
    return rows


def _sampling(temperature: float | None, top_p: float | None) -> dict | None:
    if temperature is not None and (not math.isfinite(temperature) or temperature < 0):
        raise UserError(f"--temperature must be a finite number >= 0 (0 = greedy), not {temperature}")
    if top_p is not None and (not math.isfinite(top_p) or not 0 < top_p <= 1):
        raise UserError(f"--top-p must be in (0, 1], not {top_p}")
    if not temperature and top_p is None:
        return None  # greedy
    return {"temperature": temperature or 1.0, **({"top_p": top_p} if top_p is not None else {})}


def run_generate(
    run_dir: Path,
    prompt: str | None = None,
    file: Path | None = None,
    out: Path | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
) -> list[dict]:
    """Generate for one prompt or a file of them; print (or write `out`) and return the records."""
    _check_request(prompt, file, out, seed)
    sampling = _sampling(temperature, top_p)
    cfg = load_run_config(run_dir)
    if cfg.task == "classification":
        raise UserError(f"{run_dir} is a classification run; `leantune predict` labels text with it")
    if cfg.task == "reward":
        raise UserError(f"{run_dir} is a reward model run; it scores text, it does not generate")
    chat = cfg.task == "causal_lm" and cfg.data.format != "text"
    rows = read_prompts(file, chat) if file is not None else [{"prompt": prompt}]
    setup_torch(cfg.train.seed, cfg.train.num_threads)
    from leantune.eval.generation import generate_from_ids
    from leantune.models.loader import load_tokenizer

    tok = load_tokenizer(str(run_dir / "model"))
    encoded = _encode_prompts(tok, rows, cfg, chat)
    model = load_trained_model(run_dir, cfg)
    import torch

    torch.manual_seed(seed)
    new_tokens = max_new_tokens or cfg.eval.max_new_tokens
    texts = generate_from_ids(
        model, tok, encoded, cfg.task, new_tokens, batch_size=batch_size, sampling=sampling, progress=True
    )
    records = [
        {**{k: v for k, v in row.items() if k != "_line"}, "generation": text}
        for row, text in zip(rows, texts, strict=True)
    ]
    _emit(records, texts, file, out)
    return records


def _check_request(prompt: str | None, file: Path | None, out: Path | None, seed: int) -> None:
    """What the command line asks must make sense before anything loads."""
    if (prompt is None) == (file is None):
        raise UserError('give a prompt (leantune generate RUN_DIR "text") or --file prompts.jsonl, not both')
    if prompt is not None and not prompt.strip():
        raise UserError("the prompt is empty; pass some text")
    if out is not None:
        if file is None:
            raise UserError("--out writes the generations of --file; a single prompt prints its text")
        check_new_file(out, "--out")
    if not 0 <= seed <= 2**32 - 1:
        raise UserError(f"--seed must be between 0 and {2**32 - 1}, not {seed}")


def _encode_prompts(tok, rows: list[dict], cfg, chat: bool) -> list[list[int]]:
    """Token ids of each prompt: a chat run's through its chat template, cut to the last max_length."""
    from leantune.data.chat import chat_prompt_ids
    from leantune.eval.generation import prompt_ids

    max_length = cfg.model.max_length
    if chat:
        return [
            chat_prompt_ids(tok, row.get("messages") or row["prompt"], cfg.data.system_prompt)[-max_length:]
            for row in rows
        ]
    return [prompt_ids(tok, row["prompt"], cfg.task, max_length) for row in rows]


def _emit(records: list[dict], texts: list[str], file: Path | None, out: Path | None) -> None:
    """A single prompt prints its text; a file prints JSONL, or writes it atomically to `out`."""
    if out is not None:
        from leantune.recipes.common import write_new_output

        out.parent.mkdir(parents=True, exist_ok=True)
        write_new_output(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        print(f"leantune: {len(records)} generations written to {out}")
    elif file is not None:
        print("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), end="")
    else:
        print(texts[0])
