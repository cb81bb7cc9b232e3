"""Tokenised examples kept in a memory-mapped Arrow file, so memory does not grow with the data.

A list of feature dicts of Python int lists costs ~36 bytes per token per column and stays resident for
the whole run; here the tokeniser's output is written chunk by chunk to an Arrow IPC file which
`datasets.Dataset.from_file` memory-maps (the way `datasets.map` caches do). The OS pages it in and out;
Python only ever holds the examples of the current batch (and one tokenising chunk while encoding).

`ArrowFeatures` is a read-only sequence of the same feature dicts the rest of leantune already takes
(`len`, index, slice, iterate), so the trainer, the evaluator and the samplers did not change: the order
of the examples, and therefore every batch and every `--resume`, is exactly what a list gave.

On POSIX the file is unlinked as soon as it is mapped: the mapping keeps it alive, and the disk space is
returned when the process ends, whatever way it ends (no stale cache files to clean up).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

CHUNK = 1000  # rows tokenised at a time: bounds the Python lists alive while encoding


class ArrowFeatures(Sequence):
    """A read-only, memory-mapped sequence of feature dicts (a `datasets.Dataset` underneath)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):  # a view (an indices mapping), not a copy
            return ArrowFeatures(self.dataset.select(range(len(self))[index]))
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.dataset[index]

    def __iter__(self) -> Iterator[dict]:
        return iter(self.dataset)

    def lengths(self, column: str = "input_ids") -> list[int]:
        """Tokens per example, read column-wise (cheaper than touching every row)."""
        import pyarrow.compute as pc

        values = self.dataset.with_format("arrow")[:][column]
        return pc.list_value_length(values).to_pylist()


def example_lengths(features: Sequence[dict], column: str = "input_ids") -> list[int]:
    """Tokens per example: read column-wise from a mapped split, without turning each row into a dict
    (`column="rejected_input_ids"`: a preference pair's other side)."""
    if isinstance(features, ArrowFeatures):
        return features.lengths(column)
    return [len(f[column]) for f in features]


def write_features(
    encode_chunk: Callable[[list[Any]], list[dict]], rows: list[Any], folder: Path | None = None
) -> ArrowFeatures | list:
    """Encode `rows` CHUNK at a time into one Arrow file and map it; empty input stays `[]`."""
    if not rows:
        return []
    import datasets
    import pyarrow as pa

    folder = folder or _scratch_folder()
    fd, name = tempfile.mkstemp(suffix=".arrow", dir=folder)
    os.close(fd)
    writer = schema = None
    try:
        with pa.OSFile(name, "wb") as sink:
            for start in range(0, len(rows), CHUNK):
                table = pa.Table.from_pylist(encode_chunk(rows[start : start + CHUNK]), schema=schema)
                if writer is None:
                    schema = table.schema
                    writer = pa.ipc.new_stream(sink, schema)
                writer.write_table(table)
            writer.close()  # type: ignore[union-attr]
        dataset = datasets.Dataset.from_file(name, in_memory=False)
    finally:
        if os.name == "posix":
            os.unlink(name)
    return ArrowFeatures(dataset)


def _scratch_folder() -> Path:
    from leantune.data.cache import cache_dir

    folder = cache_dir() / "features"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
