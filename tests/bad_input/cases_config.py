"""Config files and command-line overrides: unreadable, binary, wrongly encoded, empty, duplicated keys,
YAML errors, the wrong shape, a method listed twice; each for `train` and `plan`."""

from __future__ import annotations

import os
from pathlib import Path

from tests.bad_input.harness import Case, Env, train, with_data

PLAN = ("--memory-budget", "1GiB")

# id, what, content of cfg.yaml (None: a folder), phrase
FILES: list[tuple[str, str, str | bytes | None, str]] = [
    ("binary", "a binary file", bytes(range(256)), "is a binary file"),
    ("binary-tail", "YAML followed by NUL bytes", b"task: classification\n\0\0\0", "is a binary file"),
    ("latin1", "Latin-1 text", "task: classification\n# caf\xe9\n".encode("latin-1"), "is not UTF-8"),
    (
        "cp1252",
        "Windows-1252 quotes",
        "# \u201cquoted\u201d\ntask: classification\n".encode("cp1252"),
        "is not UTF-8",
    ),
    ("utf16", "UTF-16 text", "task: classification\n".encode("utf-16"), "is UTF-16"),
    ("folder", "a folder named like a config", None, "is a folder"),
    ("empty", "an empty file", "", "is empty"),
    ("comments", "only comments", "# nothing here yet\n", "is empty"),
    ("blank", "only blank lines", "\n\n   \n", "is empty"),
    ("doc-marker", "only a document marker", "---\n", "is empty"),
    ("dup-top", "`task` twice", "task: classification\ntask: causal_lm\n", "key 'task' appears twice"),
    ("dup-nested", "`train.lr` twice", "train:\n  lr: 0.001\n  lr: 0.01\n", "key 'lr' appears twice"),
    (
        "dup-section",
        "the `train` section twice",
        "train:\n  lr: 0.001\ntrain:\n  epochs: 2\n",
        "key 'train' appears twice",
    ),
    (
        "dup-method-key",
        "`r` twice in a method",
        "methods:\n  - {name: lora, r: 4, r: 8}\n",
        "key 'r' appears twice",
    ),
    ("unclosed", "an unclosed bracket", "train:\n  lr: [1,\n", "is not valid YAML"),
    ("tab", "a tab for indentation", "train:\n\tlr: 0.1\n", "is not valid YAML"),
    ("quote", "an unclosed quote", 'task: "classification\n', "is not valid YAML"),
    (
        "python-tag",
        "a python object tag",
        "train: !!python/object/apply:os.system ['true']\n",
        "is not valid YAML",
    ),
    ("list", "a list, not a mapping", "- train\n- eval\n", "must hold a mapping"),
    ("scalar", "a bare word", "classification\n", "must hold a mapping"),
    ("unknown-section", "a misspelt section", "trian:\n  lr: 0.1\n", "unknown config key 'trian'"),
    ("methods-twice", "`methods: [lora, lora]`", "methods: [lora, lora]\n", "'lora' is listed twice"),
    (
        "methods-twice-apart",
        "freeze listed twice",
        "methods: [freeze, lora, freeze]\n",
        "'freeze' is listed twice",
    ),
    (
        "methods-twice-long",
        "lora twice in block style",
        "methods:\n  - name: lora\n  - name: lora\n    r: 4\n",
        "'lora' is listed twice",
    ),
    ("methods-empty", "an empty method list", "methods: []\n", "non-empty list"),
]

OVERRIDES = [
    ("bracket", "train.lr=[", "not valid YAML"),
    ("brace", "train.lr={", "not valid YAML"),
    ("methods-bracket", "methods=[lora", "not valid YAML"),
    ("mapping-in-value", "train.lr=a: b: c", "not valid YAML"),
    ("alias", "train.lr=*x", "not valid YAML"),
    ("python-tag", "train.lr=!!python/name:os.system", "not valid YAML"),
    ("reserved-char", "train.lr=@x", "not valid YAML"),
    ("label-names", "data.label_names=[neg, pos", "not valid YAML"),
    ("quote", "train.lr='1", "not valid YAML"),
    ("backtick", "train.lr=`1`", "not valid YAML"),
    ("methods-twice", "methods=[lora, lora]", "'lora' is listed twice"),
    ("methods-twice-mixed", "methods=[lora, {name: lora, r: 4}]", "'lora' is listed twice"),
    ("no-equals", "train.lr", "not key=value"),
    ("index", "methods.3.r=4", "is not an index"),
    ("into-value", "train.lr=0.1 train.lr.x=1", "is a value, not a section"),
]


def _unreadable_chmod(env: Env) -> None:
    (env.root / "cfg.yaml").chmod(0)


def _root_skip() -> str | None:
    geteuid = getattr(os, "geteuid", None)
    return (
        "root reads a chmod 000 file anyway (see the unreadable-patched case)"
        if geteuid and geteuid() == 0
        else None
    )


def _unreadable_patched(env: Env) -> None:
    """Root ignores file modes, so make reading cfg.yaml fail the way a chmod 000 file does."""
    original = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.name == "cfg.yaml":
            raise PermissionError(13, "Permission denied", str(self))
        return original(self)

    env.monkeypatch.setattr(Path, "read_bytes", read_bytes)


def _cases() -> list[Case]:
    out = []
    for command in ("train", "plan"):
        for cid, what, content, phrase in FILES:
            argv = (command, "cfg.yaml", "@BASE@", *(PLAN if command == "plan" else ()))
            out.append(
                Case(
                    id=f"{command}-file-{cid}",
                    family="config",
                    what=f"config file: {what}",
                    argv=argv,
                    phrase=phrase,
                    files=with_data({"cfg.yaml": content}),
                )
            )
        argv = (command, "cfg.yaml", "@BASE@", *(PLAN if command == "plan" else ()))
        out.append(
            Case(
                id=f"{command}-file-unreadable-chmod",
                family="config",
                what="config file without read permission (chmod 000)",
                argv=argv,
                phrase="cannot read config file",
                files=with_data({"cfg.yaml": "task: classification\n"}),
                setup=_unreadable_chmod,
                skip=_root_skip,
            )
        )
        out.append(
            Case(
                id=f"{command}-file-unreadable-patched",
                family="config",
                what="config file that cannot be read (permission denied)",
                argv=argv,
                phrase="cannot read config file",
                files=with_data({"cfg.yaml": "task: classification\n"}),
                setup=_unreadable_patched,
            )
        )
        out.append(
            Case(
                id=f"{command}-file-missing",
                family="config",
                what="a config file that does not exist",
                argv=(command, "nope.yaml", "@BASE@", *(PLAN if command == "plan" else ())),
                phrase="config file not found",
                files=with_data(),
            )
        )
    for cid, override, phrase in OVERRIDES:
        out.append(
            Case(
                id=f"override-{cid}",
                family="config",
                what=f"override `{override}`",
                argv=train(*override.split(" ") if cid == "into-value" else (override,)),
                phrase=phrase,
                files=with_data(),
            )
        )
    return out


CASES = _cases()
