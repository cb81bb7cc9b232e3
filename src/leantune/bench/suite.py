"""A benchmark suite: a named list of runs that share settings, read from benchmarks/suites/<name>.yaml.

```yaml
name: smoke
description: what the suite shows
common: [model.max_length=64, train.epochs=1]     # applied to every run, before the run's own
runs:
  - {id: full, overrides: [methods=[full], train.lr=5e-5]}
  - {id: lora}                                      # the default job
  - {id: hf_lora, kind: hf_baseline}                # transformers.Trainer + peft, same settings
repeat: 1                                           # each run this many times, interleaved
threads: 2                                          # torch threads of every run and of the matmul peak
env: {MALLOC_MMAP_THRESHOLD_: "131072"}             # optional: environment of every run
allow_no_learning: false                            # or true (time-only suite), or run-id patterns
```

A run may set `processes: N` (leantune runs only): it is launched under torchrun with N processes, each
with threads / N torch threads (at least one), so a suite compares 1, 2, 4 processes on the same cores.

`leantune report` refuses a suite whose classification runs end at or below the majority class (see
`leantune.bench.report.check_learned`): a quality table would rank methods that learned nothing.
`allow_no_learning: true` marks a time-only suite, whose table is then labelled "did not learn";
a list of fnmatch patterns (e.g. `["*_lr1e-2_*"]`, the diverging end of an lr sweep) allows just those
runs, each labelled in its row.

Why validate everything here, before anything runs: a suite can take many minutes, and a typo in the
last run's overrides must not cost the first ones. Each run's leantune config is validated too (without
torch), so `leantune bench SUITE --dry-run` is a real check.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from leantune.config import describe_validation_error, read_yaml_mapping
from leantune.errors import UserError

SUITES_DIR = Path("benchmarks/suites")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_number_coercion(cls, value, info):
        from leantune.numbers import check_number

        return check_number(value, cls.model_fields[info.field_name].annotation)


class RunSpec(_Strict):
    id: str = Field(description="Names the artefact files (<id>-r<k>.json); letters, digits, _ . -")
    overrides: list[str] = Field(default_factory=list, description="Dotted key=value, after `common`.")
    kind: Literal["leantune", "hf_baseline"] = Field(
        "leantune", description="leantune: `leantune train`; hf_baseline: transformers.Trainer + peft."
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment variables of this run, over the suite's `env`."
    )
    processes: int = Field(
        1,
        gt=0,
        description="Data-parallel processes (torchrun --standalone --nproc-per-node N); the suite's threads "
        "are split evenly among them (at least 1 each; more processes than threads oversubscribes).",
    )

    @model_validator(mode="after")
    def _one_process_baseline(self) -> RunSpec:
        if self.kind == "hf_baseline" and self.processes > 1:
            raise ValueError("kind hf_baseline runs one process; processes must be 1")
        return self

    @field_validator("id")
    @classmethod
    def _file_safe(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError("must be letters, digits, '_', '.' or '-' (it names files)")
        return value


class Suite(_Strict):
    name: str
    description: str = ""
    common: list[str] = Field(default_factory=list, description="key=value overrides for every run.")
    runs: list[RunSpec] = Field(min_length=1)
    repeat: int = Field(1, gt=0)
    threads: int = Field(2, gt=0, description="torch threads for every run and for the matmul peak.")
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables for every run (e.g. the allocator's MALLOC_MMAP_THRESHOLD_);"
        " the artefact's command starts with them.",
    )
    allow_no_learning: bool | list[str] = Field(
        False,
        description="false: `leantune report` refuses runs that end at or below the majority class; "
        "true: a time-only suite (its table says 'did not learn'); or run-id patterns allowed to.",
    )

    @field_validator("name")
    @classmethod
    def _name_file_safe(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError("must be letters, digits, '_', '.' or '-' (it names the results folder)")
        return value

    @model_validator(mode="after")
    def _unique_ids(self) -> Suite:
        seen: set[str] = set()
        for run in self.runs:
            if run.id in seen:
                raise ValueError(f"run id '{run.id}' appears twice; give every run its own id")
            seen.add(run.id)
        return self

    def run(self, run_id: str) -> RunSpec:
        return next(r for r in self.runs if r.id == run_id)


@dataclass(frozen=True)
class PlannedRun:
    """One (run, repeat) of a suite invocation, with the exact overrides it is started with."""

    spec: RunSpec
    repeat: int  # 1-based
    overrides: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.spec.id}-r{self.repeat}"


def resolve_suite_path(suite: str | Path) -> Path:
    """A YAML path as given, or a bare name looked up in benchmarks/suites/."""
    p = Path(suite)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise UserError(f"suite file not found: {p}; pass an existing YAML (see {SUITES_DIR}/)")
        return p
    candidate = SUITES_DIR / f"{suite}.yaml"
    if not candidate.is_file():
        known = sorted(q.stem for q in SUITES_DIR.glob("*.yaml")) if SUITES_DIR.is_dir() else []
        hint = f" (known: {', '.join(known)})" if known else ""
        raise UserError(f"no suite named '{suite}' in {SUITES_DIR}/{hint}; pass a suite name or YAML path")
    return candidate


def load_suite(path: Path) -> Suite:
    tree = read_yaml_mapping(path, "suite")
    try:
        return Suite.model_validate(tree)
    except ValidationError as exc:
        why = describe_validation_error(exc, Suite, noun="key", top="suite")
        raise UserError(f"suite {path}: {why}") from None


def plan(
    suite: Suite, extra: Sequence[str] = (), only: Sequence[str] | None = None, repeat: int | None = None
) -> list[PlannedRun]:
    """Every (run, repeat) in execution order, each config validated; repeats are interleaved.

    Interleaving (all runs of repeat 1, then all of repeat 2, ...) spreads slow drift of the machine
    (thermal, other load) over every run instead of charging it to the last ones.
    Override order: threads, the suite's `common`, the run's own, then `--set` (`extra`), so the more
    specific setting wins.
    """
    from leantune.config import load_config

    ids = [r.id for r in suite.runs]
    for wanted in only or []:
        if wanted not in ids:
            raise UserError(f"--only {wanted}: no such run in suite '{suite.name}' (runs: {', '.join(ids)})")
    bad = next((o for o in [*suite.common, *extra] if "=" not in o), None)
    if bad is not None:
        raise UserError(f"override '{bad}' is not key=value; write e.g. train.lr=1e-4")
    runs = [r for r in suite.runs if not only or r.id in only]
    out = []
    for k in range(1, (repeat or suite.repeat) + 1):
        for spec in runs:
            threads = threads_per_process(suite.threads, spec.processes)
            overrides = (f"train.num_threads={threads}", *suite.common, *spec.overrides, *extra)
            try:
                cfg = load_config(None, list(overrides))
            except UserError as exc:
                raise UserError(f"suite '{suite.name}' run '{spec.id}': {exc}") from None
            if spec.kind == "hf_baseline":
                from leantune.bench.hf_baseline import check_supported

                try:
                    check_supported(cfg)
                except UserError as exc:
                    raise UserError(f"suite '{suite.name}' run '{spec.id}': {exc}") from None
            out.append(PlannedRun(spec, k, overrides))
    return out


def threads_per_process(threads: int, processes: int) -> int:
    """The suite's threads split evenly over a run's processes, at least one each."""
    return max(1, threads // processes)
