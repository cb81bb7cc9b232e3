"""The bad-input harness: one `Case` per refused input, run in-process against `leantune.cli.main`.

A case names files to create in an empty folder (plus a `setup` for anything else), the `leantune`
arguments, the exit code and a phrase the single stderr line must contain. The harness creates the
files, chdirs there, hashes the folder (paths and contents, with a sentinel file and a `.git/` folder it
always adds), runs the command, and checks: the exit code, exactly one non-empty stderr line, the
phrase, no "Traceback", and, unless `expect_unchanged=False`, an unchanged folder.

Every module `cases_*.py` in this package contributes its `CASES` list (collected by `all_cases`), so
a new family is a new file. Arguments may use these placeholders, expanded by the harness:

- `@BERT@`, `@GPT2@`: tiny random models (config + safetensors + tokenizer), built once per session;
- `@BASE@`: the base overrides of a fast, valid classification run (`BASE` below), so that each case
  changes one thing; data.csv (`DATA_CSV`) must then be among the files (use `with_data`).
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import io
import json
import os
import pkgutil
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import make_sentiment_rows

FAMILIES = ("config", "data", "model", "output", "budget", "cli")

#: stderr lines that are library noise we cannot silence (none today); matched as substrings
KNOWN_NOISE: tuple[str, ...] = ()

BASE = (
    "model.name=@BERT@",
    "model.max_length=16",
    "data.source=data.csv",
    "train.batch_size=16",
    "train.max_steps=2",
    "train.num_threads=1",
    "train.save_every=null",
    "output.tensorboard=false",
    "output.dir=run",
)


def table(rows: Sequence[Mapping[str, object]], fmt: str = "csv") -> str:
    """`rows` as the text of a .csv, .tsv or .jsonl file (values written as given)."""
    if fmt == "jsonl":
        return "".join(json.dumps(dict(r)) + "\n" for r in rows)
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n")
    writer.writerow(list(rows[0]))
    writer.writerows([list(r.values()) for r in rows])
    return buf.getvalue()


DATA_ROWS = make_sentiment_rows(48)
DATA_CSV = table(DATA_ROWS)

Files = Mapping[str, "str | bytes | None"]  # None: an empty folder


@dataclass
class Env:
    """What a `setup` callable gets: the case folder and the shared resources."""

    root: Path
    models: dict[str, Path]
    finished_run: Path  # a finished classification run on the tiny BERT (config.yaml + model/)
    monkeypatch: object  # pytest's MonkeyPatch, undone after the case

    def copy_run(self, name: str = "run") -> Path:
        dest = self.root / name
        shutil.copytree(self.finished_run, dest, symlinks=True)
        return dest

    def copy_model(self, arch: str = "bert", name: str = "model") -> Path:
        dest = self.root / name
        shutil.copytree(self.models[arch], dest)
        return dest


@dataclass(frozen=True)
class Case:
    """One refused input. `what` says in words what is wrong (it goes into docs/reliability.md)."""

    id: str
    family: str
    what: str
    argv: tuple[str, ...]
    phrase: str  # the one stderr line must contain it (case-sensitive)
    files: Files = field(default_factory=dict, repr=False)
    setup: Callable[[Env], None] | None = None  # runs after the files are written, before hashing
    code: int = 2
    expect_unchanged: bool = True  # False: the command may legitimately write (e.g. a run that stops)
    skip: Callable[[], str | None] | None = None  # returns a reason to skip, or None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES and not self.family.isidentifier():
            raise ValueError(f"case {self.id}: bad family {self.family!r}")


def with_data(files: Files | None = None) -> dict:
    """The files of a case that uses @BASE@: data.csv plus `files`."""
    return {"data.csv": DATA_CSV, **(files or {})}


def train(*extra: str) -> tuple[str, ...]:
    return ("train", "@BASE@", *extra)


def all_cases() -> list[Case]:
    """Every `CASES` of every `cases_*.py` module in this package, ids unique."""
    cases: list[Case] = []
    here = Path(__file__).parent
    for info in sorted(pkgutil.iter_modules([str(here)]), key=lambda m: m.name):
        if info.name.startswith("cases_"):
            cases += importlib.import_module(f"{__package__}.{info.name}").CASES
    ids = [c.id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"duplicate case ids: {dupes}")
    return cases


def fast_subset(cases: Sequence[Case], per_family: int = 8) -> list[Case]:
    """A deterministic spread: about `per_family` cases of each family, evenly over its table."""
    out = []
    for fam in dict.fromkeys(c.family for c in cases):
        members = [c for c in cases if c.family == fam]
        step = max(1, len(members) // per_family)
        out += members[::step]
    return out


def expand(argv: Sequence[str], models: Mapping[str, Path]) -> list[str]:
    out: list[str] = []
    for arg in argv:
        if arg == "@BASE@":
            out += expand(BASE, models)
            continue
        for arch, path in models.items():
            arg = arg.replace(f"@{arch.upper()}@", str(path))
        out.append(arg)
    return out


def write_files(root: Path, files: Files) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir(exist_ok=True)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


def tree_hash(root: Path) -> str:
    """sha256 over every path under `root` (links as links, not followed) and every file's bytes."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            h.update(f"{rel}\0{st.st_mode:o}\0".encode())
            if path.is_symlink():
                h.update(os.readlink(path).encode())
            elif path.is_file():
                try:
                    h.update(path.read_bytes())
                except PermissionError:  # an unreadable file (a case makes one): its size stands in
                    h.update(str(st.st_size).encode())
    return h.hexdigest()


def prepare(root: Path) -> None:
    """The sentinel and the `.git/` folder every case folder holds."""
    (root / "SENTINEL").write_text("must survive every refused command\n")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")


def stderr_lines(err: str) -> list[str]:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return [ln for ln in lines if not any(noise in ln for noise in KNOWN_NOISE)]
