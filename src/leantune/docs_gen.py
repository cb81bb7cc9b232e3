"""Generated documentation: docs/reference.md, and every figure README.md and docs/ quote from artefacts.

    python -m leantune.docs_gen           # rewrite docs/reference.md and every marked figure and table
    python -m leantune.docs_gen --check   # exit 1, naming each difference, when anything is out of date

Why: the reference is read off the pydantic models and the argparse parser, and each benchmark figure off
the committed artefact it comes from, so neither can drift from the code or the results unnoticed
(tests/test_docs_reference.py and tests/test_docs_figures.py run `--check`'s logic).

Two markers, both HTML comments (invisible when rendered):

- a figure in prose or a table cell: `<!--fig EXPR :FMT-->TEXT<!--/fig-->`. EXPR is arithmetic (+ - * /,
  numbers, parentheses) over references `PATH#KEY`: PATH a JSON artefact relative to the repository root,
  KEY a dotted path into it (list items by index: `epoch_train_time_s.1`). TEXT must equal
  `format(value, FMT)`; FMT is Python's format spec (`.0f`, `,.0f`, `.1%`), default `g`.
- a table: `<!--table` + a small YAML mapping + `-->`, then the rendered table, then `<!--/table-->`.
  The mapping: `folder` (a suite's results folder), `runs` (run ids, in order), `columns` (headers of
  `leantune report`'s table, `leantune.bench.report.Table`, whose cells are reused as they are), optional
  `labels` ({run id: text} for the first column) and `extra` (a list of {header, key, fmt, divide}: a KEY as
  above read from the run's first repeat, optionally divided; '–' where a run lacks it). The first column
  links each run to its artefact file.

A third marker, `<!--keys METHOD-->...<!--/keys-->`, holds the method's config keys as generated for
docs/reference.md, so each method page lists its keys and defaults without a hand-copied table.
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = Path("docs/reference.md")
REGENERATE = "python -m leantune.docs_gen"

FIG_RE = re.compile(r"<!--fig (?P<spec>.*?)-->(?P<text>.*?)<!--/fig-->", re.S)
TABLE_RE = re.compile(r"(?P<open><!--table\n(?P<spec>.*?)-->\n)(?P<body>.*?)(?P<close><!--/table-->)", re.S)
KEYS_RE = re.compile(r"(?P<open><!--keys (?P<name>\w+)-->\n)(?P<body>.*?)(?P<close><!--/keys-->)", re.S)
REF_RE = re.compile(r"(?P<path>[\w./-]+\.json)#(?P<key>[\w.-]+)")


# --- figures -------------------------------------------------------------------------------------------


def lookup(data: Any, key: str) -> Any:
    """`data` at the dotted `key` (digits index lists)."""
    for part in key.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def _load(root: Path, path: str, cache: dict[str, Any]) -> Any:
    if path not in cache:
        cache[path] = json.loads((root / path).read_text())
    return cache[path]


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _arith(node: ast.AST, names: dict[str, float]) -> float:
    if isinstance(node, ast.Expression):
        return _arith(node.body, names)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arith(node.left, names), _arith(node.right, names))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_arith(node.operand, names)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return node.value
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    raise ValueError(f"not allowed in a figure expression: {ast.dump(node)}")


def figure_value(spec: str, root: Path = ROOT, cache: dict | None = None) -> str:
    """The text a `<!--fig SPEC-->` marker must hold."""
    cache = {} if cache is None else cache
    expr, _, fmt = spec.rpartition(" :") if " :" in spec else (spec, "", "g")
    names: dict[str, Any] = {}

    def name(m: re.Match) -> str:
        names[f"_v{len(names)}"] = lookup(_load(root, m["path"], cache), m["key"])
        return f"_v{len(names) - 1}"

    source = REF_RE.sub(name, expr.strip())
    if not names:
        raise ValueError(f"figure '{spec}' names no artefact (PATH.json#KEY)")
    if source in names:  # a single reference may be a string, a number or null (shown as a dash)
        return "–" if names[source] is None else format(names[source], fmt.strip())
    return format(_arith(ast.parse(source, mode="eval"), names), fmt.strip())


def figure_artefacts(spec: str) -> list[str]:
    return [m["path"] for m in REF_RE.finditer(spec)]


# --- tables --------------------------------------------------------------------------------------------


def render_table(spec: dict, doc: Path, root: Path = ROOT) -> str:
    """The markdown table a `<!--table-->` block must hold, for the document at `doc` (repo-relative)."""
    from leantune.bench.artefact import load_artefacts
    from leantune.bench.report import Table

    folder = root / spec["folder"]
    table = Table(load_artefacts(folder), spec["runs"])
    header, rows = table.rows()
    by_id = {row[0]: dict(zip(header, row, strict=True)) for row in rows}
    columns = list(spec.get("columns", []))
    missing = [c for c in columns if c not in header]
    if missing:
        raise ValueError(f"{spec['folder']}: no column {missing} in the report table (has {header})")
    extra = spec.get("extra", [])
    labels = spec.get("labels", {})
    head = ["run"] + columns + [e["header"] for e in extra]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run_id in spec["runs"]:
        if run_id not in by_id:
            raise ValueError(f"{spec['folder']}: no artefact for run '{run_id}'")
        first = min(table.by_id[run_id])
        target = os.path.relpath(folder / f"{run_id}-r{first}.json", (root / doc).parent)
        cells = [f"[{labels.get(run_id, run_id)}]({target})"]
        cells += [by_id[run_id][c] for c in columns]
        artefact = table.first(run_id)
        for e in extra:
            try:
                value = lookup(artefact, e["key"])
            except (KeyError, IndexError, TypeError):
                value = None  # a key only some runs have (a method's report)
            if value is not None and "divide" in e:
                value = value / e["divide"]
            cells.append("–" if value is None else format(value, e.get("fmt", "g")))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


# --- checking and rewriting documents --------------------------------------------------------------------


def documents(root: Path = ROOT) -> list[Path]:
    """README.md and every markdown page under docs/, repo-relative."""
    docs = (
        sorted(p.relative_to(root) for p in (root / "docs").rglob("*.md")) if (root / "docs").is_dir() else []
    )
    return [Path("README.md"), *docs]


def refresh(text: str, doc: Path, root: Path = ROOT) -> tuple[str, list[str]]:
    """`text` with every marked figure and table regenerated, and one line per difference found."""
    problems: list[str] = []
    cache: dict[str, Any] = {}

    def fig(m: re.Match) -> str:
        try:
            want = figure_value(m["spec"], root, cache)
        except (OSError, KeyError, IndexError, TypeError, ValueError) as exc:
            problems.append(f"{doc}: figure `{m['spec']}` cannot be read from its artefact: {exc!r}")
            return m[0]
        if m["text"] != want:
            problems.append(f"{doc}: figure `{m['spec']}` reads '{m['text']}', its artefact gives '{want}'")
        return f"<!--fig {m['spec']}-->{want}<!--/fig-->"

    def table(m: re.Match) -> str:
        try:
            want = render_table(yaml.safe_load(m["spec"]), doc, root)
        except (OSError, KeyError, IndexError, TypeError, ValueError, yaml.YAMLError) as exc:
            problems.append(f"{doc}: a table cannot be rendered from its artefacts: {exc!r}")
            return m[0]
        if m["body"] != want:
            problems.append(
                f"{doc}: the table from {yaml.safe_load(m['spec'])['folder']} differs from its artefacts"
            )
        return m["open"] + want + m["close"]

    def keys(m: re.Match) -> str:
        want = method_keys_markdown(m["name"])
        if m["body"] != want:
            problems.append(f"{doc}: the config keys of method '{m['name']}' differ from its config class")
        return m["open"] + want + m["close"]

    text = TABLE_RE.sub(table, text)
    text = KEYS_RE.sub(keys, text)
    return FIG_RE.sub(fig, text), problems


# --- reference -----------------------------------------------------------------------------------------


def _type(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is not None and getattr(origin, "__name__", "") == "Literal":
        return " | ".join(f"`{a}`" for a in args)
    if args and (origin is not None and str(origin) in ("typing.Union", "<class 'types.UnionType'>")):
        return " | ".join(_type(a) for a in args)
    if annotation is type(None):
        return "null"
    if origin is Annotated:  # `Annotated[float, Field(gt=0, le=1)]` (train.lr): the type and its bounds
        metas = [meta for info in args[1:] for meta in getattr(info, "metadata", [info])]
        signs = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
        bounds = ", ".join(
            f"{sign} {getattr(meta, attr)}"
            for meta in metas
            for attr, sign in signs
            if getattr(meta, attr, None) is not None
        )
        return f"{_type(args[0])} ({bounds})" if bounds else _type(args[0])
    if origin in (list, dict):
        text = str(annotation).replace("typing.", "")
        return "list[method mapping]" if "MethodConfig" in text else text
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _default(field: Any) -> str:
    if field.default is PydanticUndefined:
        if field.default_factory is None:
            return "(required)"
        value = field.default_factory()
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return "`" + json.dumps([v.model_dump() for v in value]) + "`"
    return "`" + json.dumps(value) + "`"


def _constraints(field: Any) -> str:
    words = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "min_length": "length >="}
    out = []
    for meta in field.metadata:
        for attr, sign in words.items():
            if getattr(meta, attr, None) is not None:
                out.append(f"{sign} {getattr(meta, attr)}")
    return ", ".join(out)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _model_rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += _model_rows(annotation, f"{prefix}{name}.")
            continue
        extra = _constraints(field)
        desc = _cell(field.description or "") + (f" ({extra})" if extra else "")
        rows.append(f"| `{prefix}{name}` | {_cell(_type(annotation))} | {_cell(_default(field))} | {desc} |")
    return rows


def _cli_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = ", ".join(action.option_strings) or (action.metavar or action.dest)
        if action.option_strings and action.nargs != 0:
            name += f" {action.metavar or action.dest.upper()}"
        default = "" if action.default in (None, False, []) or action.nargs == 0 else f"`{action.default}`"
        rows.append(f"| `{_cell(str(name))}` | {_cell(action.help or '')} | {default} |")
    return rows


def method_keys_markdown(name: str) -> str:
    from leantune.methods.registry import method_config_class

    rows = [r for r in _model_rows(method_config_class(name), "") if not r.startswith("| `name` ")]
    if not rows:
        return "No keys besides `name`.\n"
    return "\n".join(["| key | type | default | notes |", "|---|---|---|---|", *rows]) + "\n"


def _auto_section() -> list[str]:
    """`methods: auto` is no registered method (recipes/auto.py resolves it first), so its keys are
    listed apart, after the methods."""
    from leantune.config import AutoConfig

    rows = [r for r in _model_rows(AutoConfig, "") if not r.startswith("| `name` ")]
    return [
        "",
        "### `auto` ([auto.md](methods/auto.md))",
        "",
        "Not a method: `methods: auto` (alone) is resolved into a method list before training.",
        "",
        "| key | type | default | notes |",
        "|---|---|---|---|",
        *rows,
    ]


def reference_markdown(root: Path = ROOT) -> str:
    from leantune.cli import build_parser
    from leantune.config import Config
    from leantune.methods.registry import shipped_methods

    out = [
        "# Reference: configuration keys and CLI",
        "",
        f"Generated from `leantune.config.Config`, each registered method's config class and "
        f"`leantune.cli.build_parser()` by `{REGENERATE}`; do not edit by hand "
        "(tests/test_docs_reference.py fails when this page differs from what the code generates).",
        "A key is set in a YAML config or as a dotted override: `leantune train configs/default.yaml "
        "train.lr=1e-3 methods.0.r=16`. `configs/default.yaml` shows every key with a comment.",
        "",
        "## Config keys",
        "",
        "| key | type | default | notes |",
        "|---|---|---|---|",
        *_model_rows(Config, ""),
        "",
        "## Methods",
        "",
        "Each entry of `methods` is a mapping with `name` and that method's keys (`methods.0.r=16` overrides "
        "the first method's `r`). What each method does, and how it measured: [the index](index.md#methods).",
    ]
    for name in shipped_methods():
        page = Path("docs/methods") / f"{name}.md"
        link = f" ([{name}.md](methods/{name}.md))" if (root / page).exists() else ""
        out += ["", f"### `{name}`{link}", "", method_keys_markdown(name).rstrip("\n")]
    out += _auto_section()
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    out += ["", "## Command line", "", "`leantune COMMAND ...`; `leantune COMMAND --help` prints the same."]
    for command, sp in sub.choices.items():
        out += ["", f"### `leantune {command}`", "", _cell(helps.get(command) or ""), ""]
        rows = _cli_rows(sp)
        if rows:
            out += ["| argument | meaning | default |", "|---|---|---|", *rows]
        else:
            out.append("No arguments.")
    return "\n".join(out) + "\n"


# --- entry point ---------------------------------------------------------------------------------------


def check(root: Path = ROOT) -> list[str]:
    """Every difference between the documents and what the code and artefacts give."""
    problems = []
    if (root / REFERENCE).read_text() != reference_markdown(root):
        problems.append(f"{REFERENCE} differs from what the code generates")
    for doc in documents(root):
        problems += refresh((root / doc).read_text(), doc, root)[1]
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=REGENERATE, description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only report differences (exit 1 when any)")
    ns = p.parse_args(argv)
    if ns.check:
        problems = check()
        for line in problems:
            print(line)
        return 1 if problems else 0
    (ROOT / REFERENCE).parent.mkdir(exist_ok=True)
    (ROOT / REFERENCE).write_text(reference_markdown())
    for doc in documents():
        text, problems = refresh((ROOT / doc).read_text(), doc)
        for line in problems:
            print("updated:", line)
        if problems:
            (ROOT / doc).write_text(text)
    print(f"wrote {REFERENCE}; review the wording around any updated figure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
