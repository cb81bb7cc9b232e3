"""Imports point one way: down the layers. Every import in every module under src/leantune is checked,
including imports inside functions and under `if TYPE_CHECKING:` (a lazy import is still a dependency).

Ranks (a module may import modules of its own rank or lower, never higher):

    0  core       leantune (the package itself), settings (the config sections), errors, atomic,
                  runfolder, numbers, outputs
    1  data       leantune.data.*
    2  models     leantune.models.*        (may use data: the embedded model lives in the data cache)
    3  memory     leantune.memory.*        (may use models: block structure, LoRA sites, packed weights)
    4  methods    leantune.methods.*       (private helpers `methods/_*.py` count as methods)
    5  config     leantune.config          (the run config: the sections plus each method's config model)
    6  eval       leantune.eval.*
    7  train      leantune.train.*         (evaluates during training: may use eval)
    8  bench      leantune.bench.*         (measures runs: may use train and eval)
    9  recipes    leantune.recipes.*       (the face: composes everything below)
   10  cli        leantune.cli, leantune.__main__
   11  docs_gen   the docs generator (reads the CLI parser and every config model)

data < models < memory and eval < train < bench are strict, so no two packages of the same band import
each other (no cycles). Within one package anything goes (a package is one unit of design).

`KNOWN_UPWARD` lists the upward edges that exist today and cannot be removed in this change, each with
its reason; the test also fails when one of them disappears, so the list only ever shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "leantune"

RANKS: dict[str, int] = {
    "": 0,  # `import leantune` / `from leantune import __version__`
    "settings": 0,  # the config sections every layer reads
    "errors": 0,
    "atomic": 0,
    "runfolder": 0,
    "numbers": 0,
    "outputs": 0,
    "__version__": 0,  # `from leantune import __version__`
    "data": 1,
    "models": 2,
    "memory": 3,
    "methods": 4,
    "config": 5,  # the composed run config: the sections plus each method's own config model
    "eval": 6,
    "train": 7,
    "bench": 8,
    "recipes": 9,
    "cli": 10,
    "docs_gen": 11,  # the docs generator reads the CLI parser and every config model
    "__main__": 10,
}

# (importing module, imported module) -> why it is still there.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}


def layer_of(module: str) -> str:
    """The layer key of a dotted module name inside the package ('' for the package itself)."""
    parts = module.split(".")
    assert parts[0] == PACKAGE, module
    return parts[1] if len(parts) > 1 else ""


def rank_of(module: str) -> int:
    key = layer_of(module)
    if key not in RANKS:
        raise AssertionError(f"{module}: no layer for '{key}'; add it to RANKS in {Path(__file__).name}")
    return RANKS[key]


def module_name(path: Path, src: Path = SRC) -> str:
    rel = path.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every leantune module `source` imports (absolute or relative, at any depth of the tree).

    `from leantune.x import y` counts as an import of `leantune.x.y` when y is a submodule and of
    `leantune.x` otherwise; both map to the same layer, so the name is kept as written (`leantune.x.y`)
    only for the report."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            if target == PACKAGE:  # `from leantune import methods`: the submodules are the imports
                found.update(f"{PACKAGE}.{a.name}" for a in node.names)
            else:
                found.add(target)
    return found


def upward_edges(modules: dict[str, tuple[str, bool]]) -> list[tuple[str, str]]:
    """(importer, imported) for every import that goes to a higher rank; `modules` maps a module name
    to (its source, whether it is a package's __init__)."""
    bad = []
    for name, (source, is_package) in sorted(modules.items()):
        own = rank_of(name)
        for target in sorted(imports_of(source, name, is_package)):
            if rank_of(target) > own:
                bad.append((name, target))
    return bad


def package_modules() -> dict[str, tuple[str, bool]]:
    return {
        module_name(path): (path.read_text(), path.name == "__init__.py")
        for path in sorted((SRC / PACKAGE).rglob("*.py"))
    }


def test_every_import_points_down_the_layers():
    modules = package_modules()
    assert len(modules) > 50  # the walk found the package
    edges = upward_edges(modules)
    unexpected = [f"{a} -> {b}" for a, b in edges if (a, b) not in KNOWN_UPWARD]
    assert not unexpected, "upward imports (lower layer -> higher layer):\n  " + "\n  ".join(unexpected)
    gone = [f"{a} -> {b}" for (a, b) in KNOWN_UPWARD if (a, b) not in edges]
    assert not gone, "fixed, remove from KNOWN_UPWARD: " + ", ".join(gone)


def test_every_module_has_a_layer():
    for name in package_modules():
        rank_of(name)


# --- the checker itself can fail ------------------------------------------------------------------------


def test_checker_reports_an_upward_edge_with_both_module_names():
    fake = {
        "leantune.memory.planner": (
            "def plan():\n    from leantune.methods.quant import quantizable_layers\n",
            False,
        ),
        "leantune.methods.lora": ("from leantune.memory.budget import parse_budget\n", False),
        "leantune.train.step": ("import leantune.models.backprop\n", False),
    }
    assert upward_edges(fake) == [("leantune.memory.planner", "leantune.methods.quant")]


@pytest.mark.parametrize(
    ("importer", "source", "is_package", "imported"),
    [
        ("leantune.models.loader", "from ..cli import main\n", False, "leantune.cli"),
        ("leantune.methods", "from . import registry\nfrom .. import recipes\n", True, "leantune.recipes"),
        ("leantune.data.tasks", "from leantune import train\n", False, "leantune.train"),
        (
            "leantune.errors",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import leantune.bench.runner\n",
            False,
            "leantune.bench.runner",
        ),
    ],
)
def test_checker_sees_relative_package_and_type_checking_imports(importer, source, is_package, imported):
    assert upward_edges({importer: (source, is_package)}) == [(importer, imported)]


def test_checker_refuses_an_unmapped_layer():
    with pytest.raises(AssertionError, match="no layer for 'plugins'"):
        upward_edges({"leantune.plugins.x": ("import os\n", False)})
