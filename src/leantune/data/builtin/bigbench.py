"""Datasets read out of the BIG-bench sdist (`bigbench==1.0.0`, Apache-2.0), never installed.

Installing bigbench pulls tensorflow/t5/seqio (minutes, 1.8 GB); we only need a few `task.json` files, so
the 358 MB sdist is downloaded once and every pinned file (bigbench_pins.py) is extracted in one streaming
pass into `~/.cache/leantune/data/bigbench/` (~190 MB). Every file carries BIG-bench's canary asking that it
never be used for training: a model trained on these sets has a contaminated BIG-bench score, so never
report BIG-bench numbers for it.

vitaminc: VitaminC fact verification (Schuster et al., 2021; Wikipedia evidence). Each example's input is
"<Wikipedia page>: <evidence sentence>\\nClaim: <claim>", label = argmax of target_scores over True / False /
Neither: 54,668 examples = 27,242 True / 20,169 False / 7,257 Neither. We keep the binary task (BoolQ
stand-in: passage + yes/no): True -> "supports", False -> "refutes", Neither dropped -> 47,411 pairs
(27,242 supports / 20,169 refutes; majority share 0.575). Columns: `text` = claim, `text_pair` = evidence
(with its page-title prefix, as BIG-bench presents it) -> set `data.text_pair_column: text_pair`. No
official splits (carved by `data.split_seed`). For distribution-shift studies: `page` = the Wikipedia page
title (3,067 distinct pages; VitaminC is contrastive, so near-identical evidence of one page lands on both
sides of a random split — split on `page` for a clean test set), `domain` = "covid" when the page is about
the 2019-20 coronavirus pandemic (5,451 pairs: 3,342 supports / 2,109 refutes) else "other" (41,960),
`evidence_words` = whitespace word count of the evidence (median 29).
"""

from __future__ import annotations

import json
from pathlib import Path

from leantune.data.builtin.bigbench_pins import TASK_SHA256
from leantune.data.cache import cache_dir, fetch_from_sdist

Record = dict
REQUIREMENT = "bigbench==1.0.0"
ROOT = "bigbench/benchmark_tasks/"
VITAMINC_LABELS = {"True": "supports", "False": "refutes"}  # "Neither" is dropped


def task_files(*tasks: str) -> list[Path]:
    """The cached task.json of each BIG-bench task folder, fetching all pinned ones on first use."""
    pins = {f"{ROOT}{task}/task.json": sha for task, sha in TASK_SHA256.items()}
    need = [f"{ROOT}{task}/task.json" for task in tasks]
    dest = fetch_from_sdist(REQUIREMENT, pins, cache_dir() / "data" / "bigbench", need=need)
    return [dest / member for member in need]


def _examples(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["examples"]


def _best(scores: dict[str, float]) -> str:
    return max(scores, key=scores.__getitem__)


def parse_vitaminc(examples: list[dict]) -> list[Record]:
    rows: list[Record] = []
    for i, example in enumerate(examples):
        verdict = VITAMINC_LABELS.get(_best(example["target_scores"]))
        if verdict is None:
            continue
        evidence, claim = example["input"].split("\nClaim: ", 1)
        page = evidence.split(": ", 1)[0] if ": " in evidence else ""
        rows.append(
            {
                "text": claim.strip(),
                "text_pair": evidence.strip(),
                "label": verdict,
                "page": page,
                "domain": "covid" if "coronavirus" in page.lower() else "other",
                "evidence_words": len(evidence.split()),
                "_line": i,
            }
        )
    return rows


def vitaminc() -> dict[str, list[Record]]:
    (path,) = task_files("vitaminc_fact_verification")
    return {"train": parse_vitaminc(_examples(path))}
