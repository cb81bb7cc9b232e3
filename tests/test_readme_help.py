"""The README quotes `leantune plan --help`'s usage "verbatim": it must stay so when options change."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def test_readme_quotes_plan_usage_verbatim() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    quoted = re.search(r"`leantune plan --help`, verbatim\):\n\n```text\n(.*?)```", readme, re.S)
    assert quoted, "the README no longer quotes plan's usage"
    env = {**os.environ, "COLUMNS": "80"}  # argparse wraps at the terminal width
    cmd = [sys.executable, "-m", "leantune", "plan", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    usage = out.split("\n\n", 1)[0] + "\n"
    assert quoted.group(1) == usage
