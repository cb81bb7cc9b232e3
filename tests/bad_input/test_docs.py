"""docs/reliability.md lists exactly the cases of the suite."""

from __future__ import annotations

from tests.bad_input.harness import all_cases
from tests.bad_input.render import DOC, REGENERATE, rendered


def test_reliability_doc_is_up_to_date():
    text = DOC.read_text(encoding="utf-8")
    up_to_date = rendered(text, all_cases()) == text
    assert up_to_date, f"docs/reliability.md is out of date; run: {REGENERATE}"


def test_run_folder_section_is_reserved():
    assert "## Run folders and resume" in DOC.read_text(encoding="utf-8")
