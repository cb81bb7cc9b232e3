"""Regression and multi-label data and settings: a score that is not a finite number, a label set that is
empty, malformed, or names a label outside the set, and the keys only one task reads; .csv and .jsonl."""

from __future__ import annotations

import json

from tests.bad_input.harness import DATA_ROWS, Case, table, train, with_data

ROW = 5  # the damaged row: line 7 of a CSV (header first), line 6 of a JSONL file
LINE = {"csv": ROW + 2, "jsonl": ROW + 1}
REGRESSION = ("task=regression", "data.label_column=score")
MULTI = ("task=multi_label", "data.label_column=labels")


def _rows(kind: str) -> list[dict]:
    """DATA_ROWS with a numeric `score` or a JSON-list `labels` column instead of `label`."""
    if kind == "score":
        return [{"text": r["text"], "score": 1.0 if r["label"] == "pos" else -1.0} for r in DATA_ROWS]
    return [{"text": r["text"], "labels": [r["label"]]} for r in DATA_ROWS]


def _damaged(kind: str, fmt: str, value: object) -> str:
    rows = _rows(kind)
    rows[ROW][kind] = value
    if fmt == "csv":  # a CSV cell holds a label list as JSON text
        rows = [{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows]
    return table(rows, fmt)


# id, what, column kind, value, phrase ({line} filled in), formats, extra overrides
CELLS = [
    ("score-text", "a score that is a word", "score", "high", "line {line}: 'score' is 'high', not a number"),
    ("score-inf", "a score 'inf'", "score", "inf", "line {line}: 'score' is 'inf', not a finite number"),
    ("score-nan", "a score 'nan' (a pandas NaN)", "score", "nan", "line {line}: 'score' is 'nan'"),
    ("score-bool", "a JSON true as a score", "score", True, "line {line}: 'score' is True, not a number"),
    ("labels-empty", "an empty label set []", "labels", [], "line {line}: 'labels' holds no label"),
    (
        "labels-unknown",
        "a label outside the training label set",
        "labels",
        ["pos", "meh"],
        "line {line}: label 'meh' is not one of the labels",
    ),
    ("labels-nested", "a list inside the label list", "labels", [["pos"]], "must be a list of label names"),
    ("labels-bad-json", "a label cell '[pos' (broken JSON)", "labels", "[pos", "is not a valid JSON list"),
]
EXTRA = {"labels-unknown": ("data.label_names=[neg, pos]",)}
FORMATS = {"score-bool": ("jsonl",), "labels-nested": ("jsonl",), "labels-bad-json": ("csv",)}

# id, what, overrides, phrase
SETTINGS = [
    ("threshold-range", "eval.threshold=1.5", (*MULTI, "eval.threshold=1.5"), "eval.threshold"),
    (
        "threshold-classification",
        "eval.threshold on a classification run",
        ("eval.threshold=0.3",),
        "eval.threshold is the multi-label decision threshold",
    ),
    (
        "separator-classification",
        "data.label_separator on a classification run",
        ("data.label_separator=|",),
        "data.label_separator splits multi-label cells",
    ),
    (
        "empty-separator",
        "data.label_separator=| unquoted (YAML reads an empty block)",
        (*MULTI, "data.label_separator=|"),
        "data.label_separator is empty",
    ),
    (
        "allow-empty-classification",
        "data.allow_empty_labels on a classification run",
        ("data.allow_empty_labels=true",),
        "data.allow_empty_labels is for task multi_label",
    ),
    (
        "regression-label-names",
        "data.label_names on a regression run",
        (*REGRESSION, "data.label_names=[a, b]"),
        "task regression predicts one score",
    ),
    (
        "regression-accuracy",
        "eval.metric=accuracy on a regression run",
        (*REGRESSION, "eval.metric=accuracy"),
        "eval.metric 'accuracy' is not a regression metric",
    ),
    (
        "multi-label-accuracy",
        "eval.metric=accuracy on a multi-label run",
        (*MULTI, "eval.metric=accuracy"),
        "eval.metric 'accuracy' is not a multi_label metric",
    ),
]


def _cases() -> list[Case]:
    out = []
    for cid, what, kind, value, phrase in CELLS:
        overrides = REGRESSION if kind == "score" else MULTI
        for fmt in FORMATS.get(cid, ("csv", "jsonl")):
            name = f"bad.{fmt}"
            out.append(
                Case(
                    id=f"train-{cid}-{fmt}",
                    family="data",
                    what=f"{what} in a .{fmt} file",
                    argv=train(*overrides, f"data.source={name}", *EXTRA.get(cid, ())),
                    phrase=phrase.format(line=LINE[fmt]),
                    files=with_data({name: _damaged(kind, fmt, value)}),
                )
            )
    out.append(
        Case(
            id="train-labels-separator-empty-name",
            family="data",
            what="a label cell 'pos||neg' with data.label_separator='|' (an empty name between)",
            argv=train(*MULTI, "data.source=bad.csv", "data.label_separator='|'"),
            phrase="holds an empty label name",
            files=with_data({"bad.csv": _damaged("labels", "csv", "pos||neg")}),
        )
    )
    for cid, what, overrides, phrase in SETTINGS:
        out.append(
            Case(
                id=f"config-{cid}",
                family="config",
                what=what,
                argv=train(*overrides),
                phrase=phrase,
                files=with_data(),
            )
        )
    return out


CASES = _cases()
