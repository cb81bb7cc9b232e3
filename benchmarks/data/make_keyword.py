"""A synthetic easy task for seed002-complexity: label = whether the keyword "banana" occurs.

3,000 rows of 6-12 words drawn from a fixed 200-word vocabulary (seeded); half the rows get the keyword
at a random position. A reference that tells difficulty apart needs one task that every method solves:
this one is decided by a single token.
    python benchmarks/data/make_keyword.py  ->  benchmarks/data/keyword.csv
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

KEYWORD = "banana"


def keyword_rows(n: int = 3000, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    vocab = [
        w
        for w in (
            f"{a}{b}"
            for a in ("ka", "lo", "mi", "ne", "po", "ru", "sa", "te", "vi", "zo")
            for b in (
                "d",
                "m",
                "n",
                "p",
                "r",
                "s",
                "t",
                "x",
                "la",
                "ri",
                "to",
                "ve",
                "mo",
                "su",
                "ga",
                "ne",
                "bi",
                "ko",
                "pu",
                "we",
            )
        )
    ]
    rows = []
    for _ in range(n):
        words = rng.choices(vocab, k=rng.randint(6, 12))
        positive = rng.random() < 0.5
        if positive:
            words.insert(rng.randint(0, len(words)), KEYWORD)
        rows.append({"text": " ".join(words), "label": "yes" if positive else "no"})
    return rows


def main(path: Path | None = None) -> Path:
    path = path or Path(__file__).with_name("keyword.csv")
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(keyword_rows())
    return path


if __name__ == "__main__":
    print(main())
