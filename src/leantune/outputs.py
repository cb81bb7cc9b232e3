"""Checks on the paths a command writes (`--out`, `--json`, `--results`), made before any work starts.

A bad output path must fail in the first second with one line, not after minutes of evaluation with a
traceback from `mkdir`. leantune never writes through a symbolic link: the file or folder it would
replace is then somewhere else, possibly not the user's to lose. (`train`'s output.dir has its own checks
in recipes/train.py.)
"""

from __future__ import annotations

from pathlib import Path

from leantune.errors import UserError


def _common(path: Path, flag: str) -> None:
    if path.is_symlink():
        raise UserError(
            f"{flag} {path} is a symbolic link; leantune does not write through links: pass a real path"
        )
    for parent in path.parents:
        if parent.is_symlink() and not parent.exists():
            raise UserError(f"{flag} {path} lies under {parent}, a broken symbolic link; pass a real path")
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {path} lies under {parent}, which is a file, not a folder")
            return


def check_new_file(path: Path, flag: str) -> None:
    """A file to be created: not there yet, not a folder, not a link, not under a file."""
    _common(path, flag)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; {flag} takes the path of a new file (e.g. out.json)")
    if path.exists():
        raise UserError(f"{flag} {path} already exists; choose another {flag} (nothing is overwritten)")


def check_new_folder(path: Path, flag: str) -> None:
    """A folder to be created whole: not there yet, not a link, not under a file."""
    _common(path, flag)
    if path.exists():
        kind = "a folder" if path.is_dir() else "a file"
        raise UserError(
            f"{flag} {path} already exists ({kind}); pass another {flag} (export never overwrites)"
        )


def check_output_root(path: Path, flag: str) -> None:
    """A folder that may exist and is added to: a folder or nothing yet, not a file, not a link."""
    _common(path, flag)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; {flag} takes a folder")
