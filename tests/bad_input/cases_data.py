"""Data: missing, NaN and 'nan' cells, labels outside the label set (non-ASCII too), malformed files;
each defect in .csv, .tsv and .jsonl, for `train` and for `eval RUN --data`."""

from __future__ import annotations

from tests.bad_input.harness import DATA_ROWS, Case, Env, table, train, with_data

ROW = 5  # the damaged row: line 7 of a CSV/TSV (header first), line 6 of a JSONL file
LINE = {"csv": ROW + 2, "tsv": ROW + 2, "jsonl": ROW + 1}
LABELS = "data.label_names=[neg, pos]"

# id, what, column, value, phrase ({line} filled in), extra overrides
CELLS = [
    ("empty-label", "an empty label cell", "label", "", "line {line}: empty 'label'", ()),
    ("blank-label", "a label cell of spaces", "label", "   ", "line {line}: empty 'label'", ()),
    ("nan-label", "label 'nan' (a pandas NaN)", "label", "nan", "line {line}: 'label' is 'nan'", ()),
    ("NaN-label", "label 'NaN'", "label", "NaN", "line {line}: 'label' is 'NaN'", ()),
    ("NULL-label", "label 'NULL'", "label", "NULL", "line {line}: 'label' is 'NULL'", ()),
    ("None-label", "label 'None'", "label", "None", "line {line}: 'label' is 'None'", ()),
    ("NA-label", "label '#N/A' (a spreadsheet error)", "label", "#N/A", "line {line}: 'label' is '#N/A'", ()),
    ("nan-text", "text 'nan' (a pandas NaN)", "text", "nan", "line {line}: 'text' is 'nan'", ()),
    ("empty-text", "an empty text cell", "text", "", "line {line}: empty 'text'", ()),
    ("blank-text", "a text cell of spaces", "text", "  ", "line {line}: empty 'text'", ()),
    (
        "superscript-label",
        "label '²' outside the label set",
        "label",
        "²",
        "line {line}: label '²' is not one",
        (LABELS,),
    ),
    (
        "unknown-label",
        "label 'neutral' outside the label set",
        "label",
        "neutral",
        "line {line}: label 'neutral'",
        (LABELS,),
    ),
]


def damaged(fmt: str, column: str, value: object) -> str:
    rows = [dict(r) for r in DATA_ROWS]
    rows[ROW][column] = value
    return table(rows, fmt)


def _jsonl_raw(line: str) -> str:
    rows = table(DATA_ROWS, "jsonl").splitlines()
    rows[ROW] = line
    return "\n".join(rows) + "\n"


def _csv_lines(fmt: str, edit) -> str:
    lines = table(DATA_ROWS, fmt).splitlines()
    edit(lines)
    return "\n".join(lines) + "\n"


def _ragged(lines: list[str]) -> None:
    lines[ROW + 1] += ",extra" if "," in lines[0] else "\textra"


# id, what, {fmt: content}, phrase
FILE_DEFECTS = [
    (
        "latin1",
        "a Latin-1 file",
        {
            f: ("text,label\ncaf\xe9 au lait,pos\n" if f != "jsonl" else '{"text": "caf\xe9"}\n').encode(
                "latin-1"
            )
            for f in ("csv", "tsv", "jsonl")
        },
        "is not UTF-8",
    ),
    ("empty-file", "an empty file", {"csv": "", "tsv": ""}, "is empty"),
    (
        "header-only",
        "a header and no rows",
        {"csv": "text,label\n", "tsv": "text\tlabel\n", "jsonl": "\n"},
        "training split",
    ),
    (
        "ragged",
        "a row with an extra field",
        {f: _csv_lines(f, _ragged) for f in ("csv", "tsv")},
        f"line {ROW + 2}: expected 2 fields, found 3",
    ),
    (
        "bad-json",
        "a line that is not JSON",
        {"jsonl": _jsonl_raw('{"text": "oops"')},
        f"line {ROW + 1}: invalid JSON",
    ),
    (
        "json-array",
        "a line that is a JSON array",
        {"jsonl": _jsonl_raw('["text", "pos"]')},
        f"line {ROW + 1}: expected a JSON object",
    ),
    (
        "json-null-label",
        "a JSON null label",
        {"jsonl": _jsonl_raw('{"text": "fine film", "label": null}')},
        f"line {ROW + 1}: empty 'label'",
    ),
    (
        "json-nan-label",
        "a JSON NaN label",
        {"jsonl": _jsonl_raw('{"text": "fine film", "label": NaN}')},
        f"line {ROW + 1}: 'label' is 'nan'",
    ),
    (
        "json-nan-text",
        "a JSON NaN text",
        {"jsonl": _jsonl_raw('{"text": NaN, "label": "pos"}')},
        f"line {ROW + 1}: 'text' is 'nan'",
    ),
    (
        "no-label-column",
        "no label column",
        {
            f: table([{"text": r["text"], "sentiment": r["label"]} for r in DATA_ROWS], f)
            for f in ("csv", "tsv", "jsonl")
        },
        "column 'label' not found",
    ),
    (
        "no-text-column",
        "no text column",
        {
            f: table([{"review": r["text"], "label": r["label"]} for r in DATA_ROWS], f)
            for f in ("csv", "tsv", "jsonl")
        },
        "column 'text' not found",
    ),
    (
        "nul-bytes",
        "NUL bytes (a binary file)",
        {"csv": b"text,label\ngood\0film,pos\n", "tsv": b"text\tlabel\n\0\0\n", "jsonl": b"\0\0\0\0"},
        "is a binary file",
    ),
    (
        "utf16",
        "UTF-16 text (Excel's Unicode export)",
        {f: table(DATA_ROWS, f).encode("utf-16") for f in ("csv", "tsv", "jsonl")},
        "is UTF-16",
    ),
    (
        "one-class",
        "a single class",
        {f: table([r for r in DATA_ROWS if r["label"] == "pos"], f) for f in ("csv", "tsv", "jsonl")},
        "at least 2",
    ),
]


def _cases() -> list[Case]:
    out = []
    for cid, what, column, value, phrase, extra in CELLS:
        for fmt in ("csv", "tsv", "jsonl"):
            name = f"bad.{fmt}"
            out.append(
                Case(
                    id=f"train-{cid}-{fmt}",
                    family="data",
                    what=f"{what} in a .{fmt} file",
                    argv=train(f"data.source={name}", *extra),
                    phrase=phrase.format(line=LINE[fmt]),
                    files=with_data({name: damaged(fmt, column, value)}),
                )
            )
    for cid, what, contents, phrase in FILE_DEFECTS:
        for fmt, content in contents.items():
            name = f"bad.{fmt}"
            out.append(
                Case(
                    id=f"train-{cid}-{fmt}",
                    family="data",
                    what=f"{what} (.{fmt})",
                    argv=train(f"data.source={name}"),
                    phrase=phrase,
                    files=with_data({name: content}),
                )
            )
    folders = [
        (
            "folder-empty-validation",
            "a data folder whose validation.csv is empty",
            {"d/train.csv": table(DATA_ROWS), "d/validation.csv": "text,label\n"},
            "split 'validation'",
        ),
        (
            "folder-no-tables",
            "a data folder without table files",
            {"d/readme.txt": "data comes later\n"},
            "holds no .csv",
        ),
        ("folder-empty", "an empty data folder", {"d": None}, "holds no .csv"),
        (
            "unknown-suffix",
            "a data file with an unknown suffix",
            {"d.txt": table(DATA_ROWS)},
            "unknown type '.txt'",
        ),
        ("missing-file", "a data file that does not exist", {}, "data file not found"),
    ]
    for cid, what, files, phrase in folders:
        source = "d" if cid.startswith("folder") else ("d.txt" if cid == "unknown-suffix" else "missing.csv")
        out.append(
            Case(
                id=f"train-{cid}",
                family="data",
                what=what,
                argv=train(f"data.source={source}"),
                phrase=phrase,
                files=with_data(files),
            )
        )
    # `leantune eval RUN --data FILE`: the run's label set decides
    for cid, what, column, value, phrase, _extra in CELLS:
        out.append(
            Case(
                id=f"eval-{cid}-csv",
                family="data",
                what=f"`eval --data`: {what}",
                argv=("eval", "run", "--data", "bad.csv"),
                phrase=phrase.format(line=LINE["csv"]),
                files={"bad.csv": damaged("csv", column, value)},
                setup=Env.copy_run,
            )
        )
    out.append(
        Case(
            id="eval-missing-column-csv",
            family="data",
            what="`eval --data`: a file without the run's label column",
            argv=("eval", "run", "--data", "bad.csv"),
            phrase="column 'label' not found",
            files={"bad.csv": table([{"text": r["text"], "y": r["label"]} for r in DATA_ROWS])},
            setup=Env.copy_run,
        )
    )
    out.append(
        Case(
            id="eval-jsonl-not-object",
            family="data",
            what="`eval --data`: a JSONL line that is a number",
            argv=("eval", "run", "--data", "bad.jsonl"),
            phrase="line 1: expected a JSON object",
            files={"bad.jsonl": "42\n"},
            setup=Env.copy_run,
        )
    )
    return out


CASES = _cases()
