"""docs/reference.md is generated from the config models and the CLI parser; it must not drift."""

from __future__ import annotations

from pathlib import Path

from leantune import docs_gen

ROOT = Path(__file__).resolve().parents[1]


def test_reference_matches_the_code():
    committed = (ROOT / docs_gen.REFERENCE).read_text()
    assert committed == docs_gen.reference_markdown(ROOT), (
        f"{docs_gen.REFERENCE} is out of date with the config models / CLI: run `{docs_gen.REGENERATE}` "
        "and commit the result"
    )


def test_reference_lists_every_method_and_command():
    from leantune.cli import build_parser
    from leantune.methods.registry import shipped_methods

    text = docs_gen.reference_markdown(ROOT)
    for name in shipped_methods():
        assert f"### `{name}`" in text
    commands = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices).choices
    for command in commands:
        assert f"### `leantune {command}`" in text


def test_check_command_finds_nothing_to_regenerate():
    assert docs_gen.check(ROOT) == [], f"run `{docs_gen.REGENERATE}`"
