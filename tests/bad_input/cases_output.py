"""Output paths of `eval --out`, `plan --json`, `export --out` and `bench --results/--work`: an existing
file or folder, a path under a file, a symbolic link (dangling, to a file, to a folder), a path under
a broken link. Refused before any work, with nothing written. (`train`'s output.dir: cases_rundir.py.)"""

from __future__ import annotations

import os
from collections.abc import Callable

from tests.bad_input.harness import Case, Env, with_data

SUITE = "name: tiny\nruns:\n  - {id: a, overrides: [train.max_steps=1]}\n"


def _link(name: str, target: str) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        os.symlink(target, env.root / name)

    return setup


# id, what, files, setup, path, {kind: phrase} where kind is "file" (a new file is expected),
# "folder" (a new folder), "root" (a folder that may exist)
PATHS = [
    (
        "existing-file",
        "an existing file",
        {"taken": "keep me\n"},
        None,
        "taken",
        {"file": "already exists", "folder": "already exists (a file)", "root": "is a file; "},
    ),
    (
        "under-file",
        "a path under a file",
        {"afile": "keep me\n"},
        None,
        "afile/out.json",
        {k: "lies under afile, which is a file" for k in ("file", "folder", "root")},
    ),
    (
        "deep-under-file",
        "a path three levels under a file",
        {"afile": "keep me\n"},
        None,
        "afile/a/b/out.json",
        {k: "lies under afile, which is a file" for k in ("file", "folder", "root")},
    ),
    (
        "dangling-link",
        "a symbolic link to nothing",
        {},
        _link("link", "nowhere"),
        "link",
        {k: "is a symbolic link" for k in ("file", "folder", "root")},
    ),
    (
        "link-to-file",
        "a symbolic link to a file",
        {"target.json": "{}\n"},
        _link("link", "target.json"),
        "link",
        {k: "is a symbolic link" for k in ("file", "folder", "root")},
    ),
    (
        "link-to-folder",
        "a symbolic link to a folder",
        {"target": None},
        _link("link", "target"),
        "link",
        {k: "is a symbolic link" for k in ("file", "folder", "root")},
    ),
    (
        "existing-folder",
        "an existing folder",
        {"adir/keep.txt": "keep me\n"},
        None,
        "adir",
        {"file": "is a folder; ", "folder": "already exists (a folder)"},
    ),
    (
        "under-broken-link",
        "a path under a broken symbolic link",
        {},
        _link("blink", "nowhere"),
        "blink/out.json",
        {k: "a broken symbolic link" for k in ("file", "folder", "root")},
    ),
]

# id, what, argv with {P}, kind, needs a finished run, extra files
COMMANDS = [
    ("eval", "eval --out", ("eval", "run", "--out", "{P}"), "file", True, {}),
    (
        "plan",
        "plan --json",
        ("plan", "@BASE@", "--memory-budget", "1GiB", "--json", "{P}"),
        "file",
        False,
        with_data(),
    ),
    ("export", "export --out", ("export", "run", "--out", "{P}"), "folder", True, {}),
    (
        "export-merge",
        "export --merge --out",
        ("export", "run", "--merge", "--out", "{P}"),
        "folder",
        True,
        {},
    ),
    (
        "bench",
        "bench --results",
        ("bench", "suite.yaml", "--results", "{P}"),
        "root",
        False,
        {"suite.yaml": SUITE},
    ),
    (
        "bench-dry",
        "bench --dry-run --results",
        ("bench", "suite.yaml", "--dry-run", "--results", "{P}"),
        "root",
        False,
        {"suite.yaml": SUITE},
    ),
    (
        "bench-work",
        "bench --work",
        ("bench", "suite.yaml", "--work", "{P}"),
        "root",
        False,
        {"suite.yaml": SUITE},
    ),
]


def _both(*setups: Callable[[Env], None] | None) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        for s in setups:
            if s is not None:
                s(env)

    return setup


def _cases() -> list[Case]:
    out = []
    for cid, cwhat, argv, kind, needs_run, cfiles in COMMANDS:
        for pid, pwhat, pfiles, psetup, path, phrases in PATHS:
            if kind not in phrases:
                continue  # e.g. an existing folder is a fine --results
            flag = next(a for a in argv if a.startswith("--") and argv[argv.index(a) + 1] == "{P}")
            out.append(
                Case(
                    id=f"{cid}-{pid}",
                    family="output",
                    what=f"`{cwhat}`: {pwhat}",
                    argv=tuple(a.replace("{P}", path) for a in argv),
                    phrase=f"{flag} {path} {phrases[kind]}"
                    if not phrases[kind].startswith("lies") and "broken" not in phrases[kind]
                    else phrases[kind],
                    files={**cfiles, **pfiles},
                    setup=_both(Env.copy_run if needs_run else None, psetup),
                )
            )
    out.append(
        Case(
            id="bench-suite-folder-is-a-file",
            family="output",
            what="`bench --results`: the suite's folder in it is a file",
            argv=("bench", "suite.yaml", "--results", "res"),
            phrase="--results res/tiny is a file",
            files={"suite.yaml": SUITE, "res/tiny": "keep me\n"},
        )
    )
    return out


CASES = _cases()
