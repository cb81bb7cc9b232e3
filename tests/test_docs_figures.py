"""Every figure README.md and docs/ quote from a benchmark artefact equals the artefact's value.

Figures are marked `<!--fig PATH.json#KEY :FMT-->TEXT<!--/fig-->` and tables `<!--table ...-->` (see
src/leantune/docs_gen.py); a quoted number that differs from its artefact fails here with the command
that regenerates it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from leantune import docs_gen

ROOT = Path(__file__).resolve().parents[1]
DOCS = docs_gen.documents(ROOT)


@pytest.mark.parametrize("doc", DOCS, ids=str)
def test_quoted_figures_equal_their_artefacts(doc):
    _, problems = docs_gen.refresh((ROOT / doc).read_text(), doc, ROOT)
    assert not problems, (
        "\n".join(problems) + f"\nregenerate with `{docs_gen.REGENERATE}` (then check the wording)"
    )


@pytest.mark.parametrize("doc", DOCS, ids=str)
def test_marked_artefacts_exist(doc):
    text = (ROOT / doc).read_text()
    for m in docs_gen.FIG_RE.finditer(text):
        for path in docs_gen.figure_artefacts(m["spec"]):
            assert (ROOT / path).is_file(), f"{doc}: figure `{m['spec']}` names a missing artefact {path}"


def _table_rows(text: str) -> list[str]:
    return [
        line for line in text.splitlines() if line.startswith("|") and not re.match(r"^\|[-| :]+\|$", line)
    ]


def _has_figure(row: str) -> bool:
    """A standalone number (12, 0.77, 1,584, 3x, 40%), not a name such as `r8`, 8-bit or MiniLM-L6."""
    text = re.sub(r"`[^`]*`|\]\([^)]*\)", "", row)
    return re.search(r"(?<![\w.-])\d[\d,.]*(?:x|%)?(?![\w-])", text) is not None


def test_every_number_bearing_readme_row_names_an_artefact():
    text = (ROOT / "README.md").read_text()
    rows = _table_rows(text)
    header_like = set()
    for block in re.split(r"\n(?!\|)", text):  # the first row of each table is its header
        lines = [ln for ln in block.splitlines() if ln.startswith("|")]
        if lines:
            header_like.add(lines[0])
    bad = [r for r in rows if r not in header_like and _has_figure(r) and "benchmarks/results/" not in r]
    assert not bad, "README table rows with figures but no artefact path:\n" + "\n".join(bad)


def test_the_row_check_sees_figures_not_names():
    assert _has_figure("| lora | 0.77x |") and _has_figure("| full | 234 s |")
    assert not _has_figure("| `quant` | 8-bit or 4-bit codes on MiniLM-L6, r8 |")


def test_the_mechanism_catches_a_wrong_figure():
    doc = Path("README.md")
    spec = "benchmarks/results/seed000-table2-core/full-r1.json#train_time_s :.0f"
    right = docs_gen.figure_value(spec, ROOT)
    assert docs_gen.refresh(f"<!--fig {spec}-->{right}<!--/fig-->", doc, ROOT)[1] == []
    assert docs_gen.refresh(f"<!--fig {spec}-->172<!--/fig-->", doc, ROOT)[1]
    ratio = (
        "benchmarks/results/seed000-table2-core/lora-r1.json#train_time_s"
        " / benchmarks/results/seed000-table2-core/full-r1.json#train_time_s :.2f"
    )
    assert docs_gen.figure_value(ratio, ROOT) == "0.77"


def test_a_missing_artefact_or_key_is_reported_not_raised():
    doc = Path("README.md")
    for spec in (
        "benchmarks/results/nope/x-r1.json#a :g",
        "benchmarks/results/seed000-table2-core/full-r1.json#nope :g",
    ):
        problems = docs_gen.refresh(f"<!--fig {spec}-->1<!--/fig-->", doc, ROOT)[1]
        assert len(problems) == 1 and "cannot be read" in problems[0]
