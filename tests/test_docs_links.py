"""Every relative link in README.md and docs/ points at a file that exists, and at a heading that exists
when it names one (GitHub's anchor rules)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from leantune import docs_gen

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")
# Pages another branch writes; linked already, checked once they exist.
WRITTEN_ELSEWHERE = {ROOT / "docs" / "reliability.md"}


def _strip_code(text: str) -> str:
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    heads = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("doc", docs_gen.documents(ROOT), ids=str)
def test_relative_links_resolve(doc):
    source = ROOT / doc
    broken = []
    for target in LINK.findall(_strip_code(source.read_text())):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = source.parent.joinpath(path).resolve() if path else source
        if not file.exists():
            if file not in WRITTEN_ELSEWHERE:
                broken.append(target)
            continue
        if anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(target)
    assert not broken, f"{doc}: links to missing files or headings: {broken}"


def test_anchor_rule():
    assert "seed-000-table-2-core-columns-seed000-table2-core" in anchors(ROOT / "docs" / "benchmarks.md")
