"""`train`'s output folder: folders that can never be a run folder, folders holding files leantune did
not write, a run folder in use, and a finished run without overwrite. Each is refused before anything is
read or written, with or without --resume; the sentinel and `.git/` of the case folder survive."""

from __future__ import annotations

import os
from collections.abc import Callable

from tests.bad_input.harness import Case, Env, train, with_data

MARKER = ".leantune-run.json"


def _link(name: str, target: str) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        os.symlink(target, env.root / name)

    return setup


def _home_here(env: Env) -> None:
    """The home folder is a folder of the case (so the refusal is checked without touching the real one)."""
    (env.root / "home").mkdir()
    (env.root / "home" / ".bashrc").write_text("export PS1='$ '\n")
    env.monkeypatch.setenv("HOME", str(env.root / "home"))


def _held(env: Env) -> None:
    """A run folder whose lock another leantune holds (this process, through its own descriptor)."""
    from leantune.runfolder import RunFolder

    RunFolder(env.root / "run").acquire()  # released when the test process ends


MARKED = {"run/" + MARKER: "{}\n", "run/config.yaml": "task: classification\n"}
FINISHED = {**MARKED, "run/summary.json": "{}\n", "run/model/config.json": "{}\n"}

# id, what, the output.dir, files, setup, phrase
UNUSABLE = [
    ("dot", "`.`, the working directory", ".", {}, None, "is the working directory"),
    ("dot-slash", "`./`, the working directory", "./", {}, None, "is the working directory"),
    ("sub-dot-dot", "`run/..`, the working directory", "run/..", {"run": None}, None, "working directory"),
    ("parent", "`..`, a parent of the working directory", "..", {}, None, "a parent of the working"),
    ("root", "`/`, the file-system root", "/", {}, None, "a parent of the working directory"),
    ("home", "`~/`, the home folder", "~/", {}, _home_here, "is the home folder"),
    ("home-abs", "the home folder by its path", "home", {}, _home_here, "is the home folder"),
    (
        "link-empty",
        "a symlink to an empty folder",
        "link",
        {"target": None},
        _link("link", "target"),
        "symlink",
    ),
    ("link-run", "a symlink to a run folder", "link", FINISHED, _link("link", "run"), "is a symlink"),
    ("link-dangling", "a dangling symlink", "link", {}, _link("link", "nowhere"), "is a symlink"),
    ("link-self", "a symlink to `.`", "link", {}, _link("link", "."), "is a symlink"),
    ("file", "a file", "notes.txt", {"notes.txt": "mine\n"}, None, "is a file"),
    (
        "under-file",
        "a path under a file",
        "notes.txt/run",
        {"notes.txt": "mine\n"},
        None,
        "lies under the file",
    ),
    ("deep-under-file", "three levels under a file", "f/a/b/c", {"f": "x\n"}, None, "lies under the file"),
]

# id, what, files (the output.dir is `run`), phrase
FOREIGN = [
    ("git-only", "a folder holding only `.git/`", {"run/.git/HEAD": "ref: refs/heads/main\n"}, "(.git)"),
    (
        "config-only",
        "a folder holding only a config.yaml (deleted whole before)",
        {"run/config.yaml": "a: 1\n"},
        "(config.yaml)",
    ),
    ("thesis", "a folder holding a user's document", {"run/thesis.tex": "years of work\n"}, "(thesis.tex)"),
    (
        "data-and-config",
        "a config.yaml beside a dataset",
        {"run/config.yaml": "a\n", "run/data.csv": "x\n"},
        "(data.csv)",
    ),
    ("hidden", "a hidden file", {"run/.env": "TOKEN=1\n"}, "(.env)"),
    (
        "own-names-unmarked",
        "leantune's names without the marker (another tool's run)",
        {"run/model/w.bin": "x", "run/checkpoints/latest": "step-1"},
        "no .leantune-run.json",
    ),
    (
        "seven",
        "seven foreign files: five named, and 2 more",
        {f"run/f{i}.txt": "x\n" for i in range(7)},
        "f0.txt, f1.txt, f2.txt, f3.txt, f4.txt and 2 more",
    ),
    (
        "marked-foreign",
        "a marked run folder with a user's file added",
        {**MARKED, "run/notes.md": "x\n"},
        "also holds files leantune did not write (notes.md)",
    ),
    (
        "finished-foreign",
        "a finished run with a user's folder added",
        {**FINISHED, "run/mine/a.txt": "x\n"},
        "(mine)",
    ),
]


def _cases() -> list[Case]:
    out = []
    for cid, what, path, files, setup, phrase in UNUSABLE:
        for resume in ((), ("--resume",)):
            suffix = "-resume" if resume else ""
            out.append(
                Case(
                    id=f"outdir-{cid}{suffix}",
                    family="rundir",
                    what=f"output.dir {what}{' (--resume)' * bool(resume)}",
                    argv=train(f"output.dir={path}", *resume),
                    phrase=phrase,
                    files=with_data(files),
                    setup=setup,
                )
            )
    for cid, what, files, phrase in FOREIGN:
        for extra in ((), ("output.overwrite=true",)):
            suffix = "-overwrite" if extra else ""
            out.append(
                Case(
                    id=f"foreign-{cid}{suffix}",
                    family="rundir",
                    what=f"{what}{' (overwrite)' * bool(extra)}",
                    argv=train(*extra),
                    phrase=phrase,
                    files=with_data(files),
                )
            )
    out += [
        Case(
            id="finished-no-overwrite",
            family="rundir",
            what="a finished run, no overwrite, no --resume",
            argv=train(),
            phrase="already holds a run",
            files=with_data(FINISHED),
        ),
        Case(
            id="held",
            family="rundir",
            what="a run folder another leantune process holds",
            argv=train(),
            phrase="in use by leantune pid",  # the pid itself: tests/test_runfolder.py
            files=with_data(FINISHED),
            setup=_held,
        ),
        Case(
            id="held-overwrite",
            family="rundir",
            what="a held run folder, with overwrite",
            argv=train("output.overwrite=true"),
            phrase="in use by leantune pid",
            files=with_data(FINISHED),
            setup=_held,
        ),
        Case(
            id="held-resume",
            family="rundir",
            what="a held run folder, with --resume",
            argv=train("--resume"),
            phrase="in use by leantune pid",
            files=with_data(FINISHED),
            setup=_held,
        ),
    ]
    return out


CASES = _cases()
