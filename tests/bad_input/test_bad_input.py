"""Every case of the bad-input tables: exit 2, one line on stderr with its phrase, nothing touched.

The default run takes a deterministic subset covering every family; `CI=true` or
`LEANTUNE_FULL_BAD_INPUT=1` runs the whole table (see harness.py for the case type).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.bad_input.harness import (
    BASE,
    DATA_CSV,
    Env,
    all_cases,
    expand,
    fast_subset,
    prepare,
    stderr_lines,
    tree_hash,
    write_files,
)

FULL = os.environ.get("CI", "").lower() == "true" or os.environ.get("LEANTUNE_FULL_BAD_INPUT") == "1"
CASES = all_cases()
SELECTED = CASES if FULL else fast_subset(CASES)


@pytest.fixture(scope="session")
def finished_run(tiny_models, tmp_path_factory) -> Path:
    """A finished classification run on the tiny BERT, trained once; cases copy it."""
    from leantune.cli import main

    root = tmp_path_factory.mktemp("bad_input_run")
    (root / "data.csv").write_text(DATA_CSV)
    argv = ["train", *expand(BASE, tiny_models)]
    argv = [a.replace("data.source=data.csv", f"data.source={root / 'data.csv'}") for a in argv]
    argv = [a.replace("output.dir=run", f"output.dir={root / 'run'}") for a in argv]
    assert main(argv) == 0
    shutil.rmtree(root / "run" / "checkpoints", ignore_errors=True)
    return root / "run"


@pytest.mark.parametrize("case", SELECTED, ids=lambda c: f"{c.family}-{c.id}")
def test_refused(case, tiny_models, finished_run, tmp_path, monkeypatch, capfd):
    from leantune.cli import main

    if case.skip is not None and (reason := case.skip()):
        pytest.skip(reason)
    root = tmp_path / "case"
    root.mkdir()
    prepare(root)
    write_files(root, case.files)
    monkeypatch.chdir(root)
    if case.setup is not None:
        case.setup(Env(root, dict(tiny_models), finished_run, monkeypatch))
    before = tree_hash(root)
    capfd.readouterr()
    code = main(expand(case.argv, tiny_models))
    err = capfd.readouterr().err
    lines = stderr_lines(err)
    assert "Traceback" not in err, err
    assert code == case.code, f"exit {code}, expected {case.code}; stderr:\n{err}"
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err}"
    assert case.phrase in lines[0], f"{case.phrase!r} not in: {lines[0]}"
    if case.expect_unchanged:
        assert tree_hash(root) == before, "the command changed the folder it was refused in"


def test_every_family_has_cases_in_the_fast_subset():
    families = {c.family for c in CASES}
    fast = fast_subset(CASES)
    for fam in families:
        assert sum(c.family == fam for c in fast) >= 6, fam
