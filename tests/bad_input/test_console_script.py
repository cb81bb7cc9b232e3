"""End to end through a real process: `python -m leantune` prints one line and exits 2.

Only a handful (each costs a fresh interpreter, ~4 s); the tables run in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bad_input.harness import prepare, tree_hash

SRC = str(Path(__file__).resolve().parents[2] / "src")


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "leantune", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "files", "phrase"),
    [
        (["train", "train.lr=.inf"], {}, "'train.lr': must be a finite number"),
        (["train", "cfg.yaml"], {"cfg.yaml": b"\x00\x01binary"}, "is a binary file"),
        (["train", "train.lr=["], {}, "not valid YAML"),
        (["plan", "--memory-budget", "1e400"], {}, "not a finite memory size"),
        (
            ["bench", "suite.yaml", "--results", "afile/x"],
            {"afile": b"keep", "suite.yaml": b"name: s\nruns: [{id: a}]\n"},
            "lies under afile",
        ),
    ],
    ids=["nonfinite-lr", "binary-config", "override-yaml", "plan-budget", "bench-results-under-file"],
)
def test_console_prints_one_line(tmp_path, args, files, phrase):
    prepare(tmp_path)
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    before = tree_hash(tmp_path)
    proc = run_cli(args, tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("leantune: error: ") and phrase in lines[0]
    assert tree_hash(tmp_path) == before
