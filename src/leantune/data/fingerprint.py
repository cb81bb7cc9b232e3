"""A cheap identity of a run's data, recorded in every checkpoint so `--resume` notices a changed dataset.

Resuming exactly needs the same examples in the same order; the order is derived from the seed and the
row count, so a file that changed in place (more rows, edited rows) would continue a different run
without any error. Hashing a whole multi-GB file at every resume is too slow, so the fingerprint is the
path, the size, the row count of each split and the sha256 of the first MiB: any append, truncation or
edit near the top changes it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

HEAD_BYTES = 1 << 20


def data_fingerprint(source: str, rows: dict[str, int]) -> dict:
    fp: dict = {"source": source, "rows": dict(rows)}
    path = Path(source).expanduser()
    if ":" not in source and path.is_file():
        with path.open("rb") as fh:
            head = fh.read(HEAD_BYTES)
        fp.update(bytes=path.stat().st_size, sha256_first_mib=hashlib.sha256(head).hexdigest())
    return fp


def _short(value: object) -> object:
    return f"{value[:12]}..." if isinstance(value, str) and len(value) > 40 else value


def fingerprint_differences(saved: dict, now: dict) -> list[str]:
    """Human-readable differences, e.g. `rows.train: 259 -> 300`; empty when the data is the same."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(set(a) | set(b))
            out += [f"{key}.{k}: {a.get(k)} -> {b.get(k)}" for k in keys if a.get(k) != b.get(k)]
        elif a != b:
            out.append(f"{key}: {_short(a)} -> {_short(b)}")
    return out
