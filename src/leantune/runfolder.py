"""Run folders: leantune deletes or overwrites only files it wrote itself, inside a folder it marked.

`leantune train` writes `.leantune-run.json` (run id, leantune version, config hash, start time) into its
output folder before anything else. Overwriting a run, or restarting one whose first start failed, acts
only on a folder with that marker and only on the names in `OWN_NAMES` (plus leantune's temporary
files); a folder holding anything else is refused with the foreign names, never cleaned. Folders that
can never be a run folder (`.`, a parent of the working directory, the home folder, a symlink) are
refused outright, whatever they hold.

One run per folder: the main process holds an exclusive `flock` on `.leantune.lock` for the whole run,
and writes its pid there, so a second run on the same folder is refused with the first one's pid. The
lock file itself is never deleted: a lock on a deleted file would not exclude a newcomer.

This module is core: it imports nothing of leantune but errors, so every layer may use it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from leantune.errors import UserError, name_some

MARKER = ".leantune-run.json"
LOCK = ".leantune.lock"
# Every top-level name a leantune run (or `leantune export` with its default destination) writes.
OWN_NAMES = frozenset(
    {
        MARKER,
        LOCK,
        "config.yaml",
        "methods_auto.json",  # methods: auto: the resolved choice, reused by --resume (recipes/auto.py)
        "metrics.jsonl",
        "summary.json",
        "checkpoints",
        "model",
        "predictions.jsonl",
        "tensorboard",  # runs before output.report_to wrote their events here
        "trackers",  # output.report_to: every tracker's files (train/logging.py)
        "best.safetensors",
        "best-checkpointed.safetensors",
        "rank_history.png",
        "merged",
        "exported",
        "hf_trainer",
        "prefix_cache",  # train.prefix_cache_ram: hidden states past the RAM bound, deleted at the run's end
    }
)


# leantune's temporaries: `.NAME.<12 hex>.tmp` (leantune.atomic.temp_sibling), nothing looser: a user's
# own `.notes.tmp` is not ours to delete
TEMPORARY = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")


def is_own(name: str) -> bool:
    """A name leantune writes in a run folder: its fixed names, `export --checkpoint`'s default folders and
    its temporaries."""
    return (
        name in OWN_NAMES
        or name.startswith(("merged-step-", "exported-step-"))
        or bool(TEMPORARY.fullmatch(name))
    )


def config_sha256(config_text: str) -> str:
    return hashlib.sha256(config_text.encode("utf-8")).hexdigest()


def _refuse_unusable(out: Path) -> None:
    """Folders that can never be a run folder, whatever they hold."""
    if out.is_symlink():
        raise UserError(
            f"output.dir {out} is a symlink; leantune writes only into a real folder: pass its target"
        )
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == out else f"lies under the file {parent}"
            raise UserError(f"output.dir {out} {where}; choose a folder path for the run")
        if parent.exists():
            break
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if resolved == cwd or cwd.is_relative_to(resolved):
        what = "the working directory" if resolved == cwd else "a parent of the working directory"
        raise UserError(
            f"output.dir {out} is {what}; a run needs a folder of its own: use e.g. output.dir=runs/NAME"
        )
    if resolved == Path.home().resolve():
        raise UserError(f"output.dir {out} is the home folder; use a folder of its own, e.g. ~/runs/NAME")


def holder_pid(out: Path) -> int | None:
    """The pid of the leantune process running in `out`, or None when no run holds its lock."""
    lock = out / LOCK
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = lock.read_text(encoding="utf-8", errors="replace").strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)  # closing also releases a shared lock we got
    return None


def _refuse_in_use(out: Path) -> None:
    pid = holder_pid(out)
    if pid is not None:
        who = f"pid {pid}" if pid > 0 else "another process"
        raise UserError(
            f"run folder {out} is in use by leantune {who}; wait for it to end or choose another output.dir"
        )


def foreign_names(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if not is_own(p.name))


def check_output_dir(
    out: Path,
    resume: bool,
    overwrite: bool,
    has_checkpoint: Callable[[Path], bool] = lambda _: False,
    held: bool = False,
) -> None:
    """Refuse, before anything is read or written, every output folder a run may not use.

    For a new run: a missing or empty folder, or a marked run folder holding only leantune's files whose
    earlier start failed (no intact checkpoint, as `has_checkpoint(out)` judges, and no summary) or that
    `overwrite` allows replacing. For --resume:
    a marked run folder; files the user added beside the run are left alone (resume only writes its own).
    `held`: this process holds the folder's lock (the check is repeated under the lock, right before the
    first write, because another run may have finished in the folder while this one loaded its model).
    """
    _refuse_unusable(out)
    if out.exists() and not held:
        _refuse_in_use(out)
    if not out.exists() or all(p.name == LOCK for p in out.iterdir()):  # a lock alone: killed at its start
        if resume:
            raise UserError(f"nothing to resume in {out} (no run there); run without --resume")
        return
    if not (out / MARKER).is_file():
        foreign = foreign_names(out) or sorted(p.name for p in out.iterdir())
        raise UserError(
            f"output folder {out} is not a marked leantune run folder (no {MARKER}) and holds files "
            f"leantune did not write ({name_some(foreign)}); leantune only writes into an empty folder or "
            "its own run folder: choose another output.dir"
        )
    if resume:
        return
    foreign = foreign_names(out)
    if foreign:
        raise UserError(
            f"run folder {out} also holds files leantune did not write ({name_some(foreign)}); "
            "move them out or choose another output.dir: leantune never deletes them"
        )
    # a start that failed wrote nothing a user could miss: no checkpoint (even a damaged one), no best or
    # final weights, no summary; a killed run with save_every: null has best.safetensors and is kept
    trained = ("summary.json", "best.safetensors", "best-checkpointed.safetensors", "model")
    failed_start = (
        not has_checkpoint(out)
        and not any((out / "checkpoints").glob("step-*"))
        and not any((out / name).exists() for name in trained)
    )
    if not overwrite and not failed_start:
        raise UserError(
            f"output folder {out} already holds a run; use --resume to continue it, "
            "output.overwrite=true to replace it, or another output.dir"
        )


class RunFolder:
    """The run folder held by this process: locked, marked, and cleaned of an earlier run's files only."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self._fd: int | None = None

    def acquire(self) -> RunFolder:
        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            _refuse_in_use(self.out)
            raise UserError(f"run folder {self.out} is in use by another leantune process") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the lock goes with the descriptor; the file stays (see module doc)
            self._fd = None

    def __enter__(self) -> RunFolder:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def clear_previous_run(self) -> None:
        """Delete an earlier run's own files (overwrite, failed start); never a name it did not write."""
        for path in self.out.iterdir():
            if path.name == LOCK or not is_own(path.name):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()

    def write_marker(self, config_hash: str, version: str) -> None:
        from leantune.atomic import write_json_atomic

        write_json_atomic(
            self.out / MARKER,
            {
                "run_id": uuid.uuid4().hex,
                "leantune_version": version,
                "config_sha256": config_hash,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "pid": os.getpid(),
                "own_names": sorted(OWN_NAMES),
            },
        )


def read_marker(out: Path) -> dict:
    try:
        return json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
