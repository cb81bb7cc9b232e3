"""Turn `data.source` into named splits of raw records (dicts), each remembering where it came from.

Every record carries `_line` (file line number or dataset row) so that a bad row is reported where the
user can find it. A file is one split (`train`); a folder with train/validation/test files is several.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from leantune.data.builtin import load_builtin
from leantune.errors import UserError

Record = dict
Splits = dict[str, list[Record]]
FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


def read_table(path: Path) -> list[Record]:
    """Read CSV/TSV (header row) or JSONL (one object per line) with line numbers and clear errors."""
    try:
        return _read_table(path)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except csv.Error as exc:
        raise UserError(f"{path}: malformed CSV ({exc}); check its quoting") from None


def _read_table(path: Path) -> list[Record]:
    if not path.is_file():
        raise UserError(f"data file not found: {path}; fix data.source (or --data)")
    with path.open("rb") as fh:
        head = fh.read(1 << 16)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):  # Excel's "Unicode text" export
        raise UserError(f"{path} is UTF-16 text; save it as UTF-8")
    if b"\0" in head:
        raise UserError(f"{path} is a binary file (it holds NUL bytes), not text; export it as CSV/JSONL")
    if path.suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    if path.suffix not in (".csv", ".tsv"):
        raise UserError(f"data file {path} has unknown type '{path.suffix}'; use .csv, .tsv or .jsonl")
    delimiter = "\t" if path.suffix == ".tsv" else ","
    rows: list[Record] = []
    # utf-8-sig: spreadsheet exports start with a byte-order mark that would stick to the first column name
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, delimiter=delimiter, strict=True)
        header = next(reader, None)
        if not header:
            raise UserError(f"data file {path} is empty; it needs a header row and at least one row")
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(header):
                raise UserError(
                    f"{path} line {reader.line_num}: expected {len(header)} fields, found {len(fields)}; "
                    "quote fields that contain the delimiter"
                )
            rows.append({**dict(zip(header, fields, strict=True)), "_line": reader.line_num})
    return rows


def _read_jsonl(path: Path) -> list[Record]:
    rows: list[Record] = []
    with path.open(encoding="utf-8-sig") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{path} line {line_no}: invalid JSON ({exc.msg}); one object per line"
                ) from None
            if not isinstance(obj, dict):
                raise UserError(f"{path} line {line_no}: expected a JSON object, found {type(obj).__name__}")
            obj["_line"] = line_no
            rows.append(obj)
    return rows


def _load_hf(spec: str) -> Splits:
    import datasets

    name, _, config = spec.partition(":")
    try:
        dsd = datasets.load_dataset(name, config or None)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot load dataset '{spec}' with datasets.load_dataset: {first}") from None
    return {split: [dict(r, _line=i) for i, r in enumerate(ds)] for split, ds in dsd.items()}


def load_source(source: str) -> tuple[Splits, list[str] | None]:
    """Splits and, for built-ins, their label names."""
    if source.startswith("builtin:"):
        return load_builtin(source.split(":", 1)[1])
    if source.startswith("hf:"):
        return _load_hf(source[3:]), None
    path = Path(source).expanduser()
    if path.is_dir():
        splits = {f.stem: read_table(f) for f in sorted(path.iterdir()) if f.suffix in FILE_SUFFIXES}
        if not splits:
            raise UserError(f"data folder {path} holds no .csv/.tsv/.jsonl files; add train.csv etc.")
        return splits, None
    return {"train": read_table(path)}, None


def carve(rows: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Split off a seeded random `fraction` of rows: (rest, carved)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n = round(len(rows) * fraction)
    carved = set(order[:n])
    return [r for i, r in enumerate(rows) if i not in carved], [rows[i] for i in sorted(carved)]
