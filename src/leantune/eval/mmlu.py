"""MMLU k-shot accuracy of a causal LM, scored by the log-likelihood of the answer letter.

The format and scoring follow Hendrycks et al.'s original evaluation (and lm-eval-harness's `mmlu`
task): a subject header, k solved examples, the question, "Answer:", then the prediction is the letter
among " A".." D" with the highest next-token log-probability. One forward pass per question, no
generation, so a model that rambles is still scored on what it believes.

Only the MMLU *test* split ships offline (shared/OFFLINE.md), so the k shots are drawn from the same
subject's test questions minus the question itself (and minus any exact duplicate of its text), seeded
per question: the numbers are close to, not identical with, the dev-split protocol. A prompt longer than
the model's positions loses shots (the original code does the same) and the count of such questions is
reported. Existing harnesses (lm-eval-harness) fetch the data from the hub and run their own model
loading, which is why this ~150-line scorer exists.
"""

from __future__ import annotations

import difflib
import random
from collections import defaultdict

from leantune.errors import UserError

LETTERS = ("A", "B", "C", "D")
HEADER = "The following are multiple choice questions (with answers) about {}.\n\n"


def load_mmlu_records() -> list[dict]:
    """The MMLU test questions from the built-in data set (fetched and cached on first use)."""
    try:
        from leantune.data.builtin import mmlu_records
    except ImportError:
        raise UserError(
            "this install has no built-in MMLU data (leantune.data.builtin.mmlu_records); "
            "update leantune or pass the records to leantune.eval.mmlu.mmlu_accuracy yourself"
        ) from None
    return mmlu_records()


def format_question(rec: dict, with_answer: bool) -> str:
    lines = [rec["question"].strip(), *(f"{L}. {c}" for L, c in zip(LETTERS, rec["choices"], strict=True))]
    text = "\n".join(lines) + "\nAnswer:"
    return f"{text} {rec['answer']}\n\n" if with_answer else text


def format_prompt(rec: dict, shots: list[dict]) -> str:
    header = HEADER.format(rec["subject"].replace("_", " "))
    return header + "".join(format_question(s, True) for s in shots) + format_question(rec, False)


def check_records(records: list[dict]) -> None:
    for i, rec in enumerate(records):
        missing = {"question", "choices", "answer", "subject"} - set(rec)
        if missing or len(rec["choices"]) != 4 or rec["answer"] not in LETTERS:
            raise UserError(
                f"MMLU record {i} is malformed (needs question, 4 choices, answer A-D, subject); fix the data"
            )


def select_questions(
    records: list[dict], max_questions: int | None, subjects: list[str] | None, seed: int
) -> list[int]:
    """Indices of the questions to ask: the chosen subjects, then a seeded subset in original order."""
    known = sorted({r["subject"] for r in records})
    for s in subjects or []:
        if s not in known:
            hint = difflib.get_close_matches(s, known, n=1)
            raise UserError(f"MMLU has no subject '{s}'" + (f"; did you mean '{hint[0]}'?" if hint else ""))
    chosen = [i for i, r in enumerate(records) if not subjects or r["subject"] in subjects]
    if max_questions is not None and max_questions < len(chosen):
        chosen = sorted(random.Random(seed).sample(chosen, max_questions))
    return chosen


def draw_shots(records: list[dict], index: int, k: int, seed: int, by_subject: dict[str, list[int]]):
    """k solved examples of the same subject, never the question itself; the same for the same seed."""
    question = records[index]["question"].strip()
    pool = [
        j
        for j in by_subject[records[index]["subject"]]
        if j != index and records[j]["question"].strip() != question
    ]
    rng = random.Random(f"{seed}:{index}")  # per question, so a subset or a shard draws the same shots
    return [records[j] for j in rng.sample(pool, min(k, len(pool)))]


class PromptEncoder:
    """Prompt -> ids as the tokenizer's model expects (its BOS, but no trailing EOS/SEP), + letter ids."""

    def __init__(self, tok) -> None:
        plain = tok("Answer:", add_special_tokens=False)["input_ids"]
        full = tok("Answer:")["input_ids"]
        at = next((k for k in range(len(full)) if full[k : k + len(plain)] == plain), None)
        self.prefix = full[:at] if at is not None else []
        self.tok = tok
        self.letter_ids = []
        for letter in LETTERS:
            ids = tok(f"Answer: {letter}", add_special_tokens=False)["input_ids"]
            if len(ids) != len(plain) + 1 or ids[: len(plain)] != plain:
                raise UserError(
                    f"the tokenizer does not make ' {letter}' one token after 'Answer:'; cannot score MMLU"
                )
            self.letter_ids.append(ids[-1])
        if len(set(self.letter_ids)) != 4:
            raise UserError("the tokenizer maps the answer letters to the same token; cannot score MMLU")

    def __call__(self, text: str) -> list[int]:
        return self.prefix + self.tok(text, add_special_tokens=False)["input_ids"]


def _max_positions(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def mmlu_accuracy(
    model,
    tok,
    records: list[dict],
    shots: int,
    max_questions: int | None = None,
    subjects: list[str] | None = None,
    seed: int = 0,
    batch_size: int = 8,
    rank: int = 0,
    world: int = 1,
) -> dict:
    """Accuracy overall and per subject; each rank scores its share of the questions, all get the result."""
    check_records(records)
    encode = PromptEncoder(tok)
    by_subject: dict[str, list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        by_subject[rec["subject"]].append(i)
    asked = select_questions(records, max_questions, subjects, seed)
    if not asked:
        raise UserError("no MMLU question selected; check the subjects filter")
    limit = _max_positions(model)
    prompts: list[tuple[int, list[int], int]] = []  # (question index, ids, shots used)
    for i in asked[rank::world]:
        examples = draw_shots(records, i, shots, seed, by_subject)
        ids = encode(format_prompt(records[i], examples))
        while limit and len(ids) > limit and examples:  # too long: fewer shots, as the original code does
            examples = examples[:-1]
            ids = encode(format_prompt(records[i], examples))
        prompts.append((i, ids[-limit:] if limit else ids, len(examples)))

    scores = letter_logprobs(
        model, [ids for _, ids, _ in prompts], encode.letter_ids, tok.pad_token_id, batch_size, rank == 0
    )
    picked = [
        (i, LETTERS[max(range(4), key=row.__getitem__)], used)
        for (i, _, used), row in zip(prompts, scores, strict=True)
    ]
    if world > 1:
        from accelerate.utils import gather_object

        picked = gather_object(picked)
    return _summarise(records, picked, shots)


def letter_logprobs(
    model,
    prompts: list[list[int]],
    letter_ids: list[int],
    pad_id: int | None,
    batch_size: int = 8,
    progress: bool = False,
) -> list[list[float]]:
    """log p(letter | prompt) for each prompt and letter, from one forward pass per batch."""
    import torch
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    letters = torch.tensor(letter_ids, device=device)
    pad = pad_id if pad_id is not None else 0
    order = sorted(range(len(prompts)), key=lambda j: -len(prompts[j]))  # similar lengths share a batch
    out: list[list[float]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts), desc="mmlu", unit="question", disable=not progress, dynamic_ncols=True)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(prompts[j]) for j in idx)
            # left padding puts every prompt's last token in the last column; positions count real tokens
            ids = torch.tensor([[pad] * (width - len(prompts[j])) + prompts[j] for j in idx], device=device)
            mask = torch.tensor(
                [[0] * (width - len(prompts[j])) + [1] * len(prompts[j]) for j in idx], device=device
            )
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(
                input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1
            ).logits
            scores = torch.log_softmax(logits[:, -1].float(), dim=-1)[:, letters]
            for j, row in zip(idx, scores.tolist(), strict=True):
                out[j] = row
            bar.update(len(idx))
    bar.close()
    model.train(was_training)
    return out


def _summarise(records: list[dict], picked: list[tuple[int, str, int]], shots: int) -> dict:
    per_subject: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for i, letter, _ in picked:
        tally = per_subject[records[i]["subject"]]
        tally[0] += letter == records[i]["answer"]
        tally[1] += 1
    correct = sum(c for c, _ in per_subject.values())
    return {
        "accuracy": correct / len(picked),
        "n": len(picked),
        "shots": shots,
        "chance": 0.25,
        "questions_with_fewer_shots": sum(used < shots for _, _, used in picked),
        "per_subject": {s: {"accuracy": c / n, "n": n} for s, (c, n) in sorted(per_subject.items())},
        "predictions": {str(i): letter for i, letter, _ in sorted(picked)},
    }
