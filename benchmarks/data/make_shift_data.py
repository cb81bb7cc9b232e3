"""Write the length-shift datasets of suite seed000-shift (folders of train/validation/test CSV files).

Shift is defined by snippet length in words (whitespace tokens) over all 10,568 Rotten Tomatoes
snippets, with percentiles P50/P70/P90 of that length:
  train + validation: snippets of at most P50 words (the short half), minus the `none` test set
  none:     test on held-out snippets of the same short bucket (<= P50)
  mild:     test on P50 < length <= P70
  moderate: test on P70 < length <= P90
  severe:   test on length > P90
Every test set is a seeded sample of 1,000 snippets; the training data is the same in all four folders,
so the runs differ only in the test set. Usage:  python benchmarks/data/make_shift_data.py [OUT_DIR]
(default runs/shift-data; the suite expects that folder).
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

from leantune.data.builtin import rotten_tomatoes

SEED = 0
TEST_SIZE = 1000
VALIDATION_SIZE = 500


def _write(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows({"text": r["text"], "label": r["label"]} for r in rows)


def main(out: Path) -> None:
    rows = rotten_tomatoes()["train"]
    lengths = sorted(len(r["text"].split()) for r in rows)
    p50, p70, p90 = (lengths[int(q * (len(lengths) - 1))] for q in (0.5, 0.7, 0.9))
    rng = random.Random(SEED)
    rng.shuffle(rows)
    short = [r for r in rows if len(r["text"].split()) <= p50]
    buckets = {
        "none": short[:TEST_SIZE],
        "mild": [r for r in rows if p50 < len(r["text"].split()) <= p70][:TEST_SIZE],
        "moderate": [r for r in rows if p70 < len(r["text"].split()) <= p90][:TEST_SIZE],
        "severe": [r for r in rows if len(r["text"].split()) > p90][:TEST_SIZE],
    }
    validation = short[TEST_SIZE : TEST_SIZE + VALIDATION_SIZE]
    train = short[TEST_SIZE + VALIDATION_SIZE :]
    for level, test in buckets.items():
        folder = out / level
        folder.mkdir(parents=True, exist_ok=True)
        _write(folder / "train.csv", train)
        _write(folder / "validation.csv", validation)
        _write(folder / "test.csv", test)
    sizes = f"train {len(train)}, validation {len(validation)}"
    print(f"P50/P70/P90 = {p50}/{p70}/{p90} words; {sizes}; -> {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/shift-data"))
