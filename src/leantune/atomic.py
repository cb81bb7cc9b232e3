"""Atomic file writes: write a temporary sibling, flush it to disk, rename it over the target.

A kill at any moment leaves either the old file or the new one, never a torn one. Used for everything a
later command reads back: configs, summaries, checkpoints' JSON, benchmark artefacts and reports.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def temp_sibling(path: Path) -> Path:
    """A unique hidden name beside `path` (`.NAME.<random>.tmp`): two writers never share a temporary."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def _discard(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = temp_sibling(path)
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk or a kill: no temporary is left behind
        _discard(tmp)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def copy_atomic(src: Path, dst: Path) -> None:
    tmp = temp_sibling(dst)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        _discard(tmp)
        raise


def write_folder_atomic(dest: Path, write: Callable[[Path], None], replace: bool = True) -> None:
    """`write(tmp)` fills a temporary sibling folder that then becomes `dest`; a failure leaves no trace.

    `replace=True` is for a `dest` of leantune's own (a run's `model/`, a cache entry): an existing one is
    moved aside, the new one renamed in, then the old one removed, so a kill leaves one of them whole.
    `replace=False` (export) never deletes: a `dest` that appeared while `write` ran is an error
    (`FileExistsError`), and the temporary folder is discarded.
    """
    tmp = temp_sibling(dest)
    old = temp_sibling(dest)
    try:
        write(tmp)
        if not dest.exists():
            os.rename(tmp, dest)
        elif not replace:
            raise FileExistsError(errno.EEXIST, "appeared while writing", str(dest))
        else:
            os.rename(dest, old)
            try:
                os.rename(tmp, dest)
            except BaseException:
                os.rename(old, dest)  # the old one stays where it was
                raise
    finally:
        _discard(tmp)
        _discard(old)


def write_new_text(path: Path, text: str) -> None:
    """Write `path` atomically, never over an existing file, even one created while writing: the
    temporary is hard-linked into place (`FileExistsError` if `path` exists by then), then unlinked."""
    tmp = temp_sibling(path)
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
