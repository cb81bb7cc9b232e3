"""The README's set-up commands are what CI runs: a missing install step must fail CI, not a newcomer."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_ci_runs_the_readmes_test_command_after_the_readmes_torch():
    install, test = _setup_blocks()
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith("#")]
    assert ci[-1] == test, "the last line of .ci/run must be the README's test command"
    torch_install = install.split(" && ")[0]
    assert torch_install.startswith("pip install torch==") and torch_install in ci
    assert "pytest -q" in test and "ruff check ." in test and "ruff format --check ." in test


def test_the_pinned_torch_is_inside_the_declared_range():
    from packaging.specifiers import SpecifierSet

    install, _ = _setup_blocks()
    pinned = install.split(" && ")[0].split("==")[1]
    declared = re.search(r'"torch([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert pinned in SpecifierSet(declared), (pinned, declared)
