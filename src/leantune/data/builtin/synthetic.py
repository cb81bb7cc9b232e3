"""synthetic_topics: a generated multi-label set (no package ships a real one that we may use offline).

Each of 2,000 rows mentions one to three of five topics (sports, music, food, travel, science) through
two keywords per topic, mixed with filler words; one row in ten also carries a stray keyword of a topic
it is *not* labelled with, so a perfect score needs more than keyword spotting. `labels` is the row's
topic list. Seeded, so every machine builds the same rows. It exercises the multi-label path end to end
(tests, the shipped config); it says nothing about real-world quality.
"""

from __future__ import annotations

import random

Record = dict

TOPICS: dict[str, list[str]] = {
    "food": ["pasta", "bread", "cheese", "soup", "spices", "bakery", "dinner", "recipe", "chef", "salad"],
    "music": ["guitar", "concert", "melody", "album", "drummer", "choir", "piano", "song", "band", "jazz"],
    "science": ["physics", "lab", "experiment", "theory", "molecule", "telescope", "atom", "gene", "cell"],
    "sports": ["football", "goal", "match", "coach", "league", "tennis", "runner", "team", "stadium"],
    "travel": ["flight", "hotel", "passport", "beach", "museum", "train", "luggage", "tour", "island", "map"],
}
FILLER = ["the", "a", "we", "really", "about", "today", "with", "and", "new", "some", "talk", "week"]
LABELS = sorted(TOPICS)


def synthetic_topics(n: int = 2000, seed: int = 0) -> dict[str, list[Record]]:
    rng = random.Random(seed)
    rows: list[Record] = []
    for i in range(n):
        k = rng.choices([1, 2, 3], weights=[0.5, 0.35, 0.15])[0]
        chosen = sorted(rng.sample(LABELS, k))
        words = [w for t in chosen for w in rng.sample(TOPICS[t], 2)] + rng.sample(FILLER, 4)
        if rng.random() < 0.1:
            words.append(rng.choice(TOPICS[rng.choice([t for t in LABELS if t not in chosen])]))
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "labels": chosen, "_line": i + 1})
    return {"train": rows}
