"""The command line itself: unknown commands and options, bad option values, contradicting options,
folders that are not runs, suites that do not exist."""

from __future__ import annotations

from tests.bad_input.harness import Case, Env

SUITE = "name: tiny\nruns:\n  - {id: a, overrides: [train.max_steps=1]}\n"
# a finished artefact of that suite's run, its test accuracy below the majority share
NO_LEARNING = (
    '{"schema": 1, "run_id": "a", "repeat": 1, "kind": "leantune", "methods": ["lora"], '
    '"metrics": {"test": {"accuracy": 0.45, "majority_accuracy": 0.55}}}'
)

# id, what, argv, phrase, files, setup
ROWS = [
    ("no-command", "no command", (), "required: command", {}, None),
    ("unknown-command", "a misspelt command", ("trian",), "invalid choice: 'trian'", {}, None),
    ("eval-no-run", "eval without a run folder", ("eval",), "give a run folder", {}, None),
    (
        "eval-not-a-run",
        "eval of a folder that is not a run",
        ("eval", "notarun"),
        "is not a leantune run",
        {"notarun/x.txt": "x"},
        None,
    ),
    (
        "eval-missing-run",
        "eval of a folder that does not exist",
        ("eval", "nowhere"),
        "is not a leantune run",
        {},
        None,
    ),
    (
        "eval-unfinished",
        "eval of a run without a saved model",
        ("eval", "half"),
        "has no saved model",
        {"half/config.yaml": "task: classification\n"},
        None,
    ),
    (
        "eval-split",
        "eval --split dev",
        ("eval", "run", "--split", "dev"),
        "--split must be train, validation or test",
        {},
        Env.copy_run,
    ),
    (
        "eval-mmlu-and-data",
        "eval --mmlu with --data",
        ("eval", "run", "--mmlu", "0", "--data", "x.csv"),
        "--mmlu scores MMLU only",
        {},
        None,
    ),
    (
        "eval-mmlu-questions-alone",
        "--mmlu-questions without --mmlu",
        ("eval", "run", "--mmlu-questions", "5"),
        "need --mmlu K",
        {},
        None,
    ),
    (
        "eval-mmlu-questions-zero",
        "--mmlu-questions 0",
        ("eval", "--mmlu", "0", "--mmlu-questions", "0"),
        "at least 1",
        {},
        None,
    ),
    ("eval-mmlu-text", "--mmlu five", ("eval", "run", "--mmlu", "five"), "invalid int value", {}, None),
    ("eval-mmlu-negative", "--mmlu -1", ("eval", "--model", "x", "--mmlu=-1"), "not -1", {}, None),
    (
        "eval-mmlu-both",
        "--mmlu with a run and --model",
        ("eval", "run", "--model", "x", "--mmlu", "0"),
        "give exactly one",
        {},
        None,
    ),
    (
        "eval-model-without-mmlu",
        "--model without --mmlu",
        ("eval", "--model", "x"),
        "--model is for --mmlu",
        {},
        None,
    ),
    (
        "export-not-a-run",
        "export of a folder that is not a run",
        ("export", "notarun"),
        "is not a leantune run",
        {"notarun/x.txt": "x"},
        None,
    ),
    (
        "export-unfinished",
        "export of a run without a saved model",
        ("export", "half"),
        "has no saved model",
        {"half/config.yaml": "task: classification\n"},
        None,
    ),
    (
        "bench-repeat-zero",
        "bench --repeat 0",
        ("bench", "suite.yaml", "--repeat", "0"),
        "at least 1, got '0'",
        {"suite.yaml": SUITE},
        None,
    ),
    (
        "bench-repeat-text",
        "bench --repeat x",
        ("bench", "suite.yaml", "--repeat", "x"),
        "got 'x'",
        {"suite.yaml": SUITE},
        None,
    ),
    (
        "bench-repeat-fraction",
        "bench --repeat 1.5",
        ("bench", "suite.yaml", "--repeat", "1.5"),
        "got '1.5'",
        {"suite.yaml": SUITE},
        None,
    ),
    (
        "bench-missing-suite",
        "bench of a suite file that does not exist",
        ("bench", "nope.yaml"),
        "suite file not found",
        {},
        None,
    ),
    (
        "bench-unknown-suite",
        "bench of an unknown suite name",
        ("bench", "nope"),
        "no suite named 'nope'",
        {},
        None,
    ),
    (
        "bench-empty-suite",
        "bench of an empty suite file",
        ("bench", "suite.yaml", "--dry-run"),
        "is empty",
        {"suite.yaml": ""},
        None,
    ),
    (
        "bench-dup-key-suite",
        "a suite with a key twice",
        ("bench", "suite.yaml", "--dry-run"),
        "key 'name' appears twice",
        {"suite.yaml": "name: a\nname: b\n" + SUITE.split("\n", 1)[1]},
        None,
    ),
    (
        "bench-binary-suite",
        "a binary suite file",
        ("bench", "suite.yaml", "--dry-run"),
        "is a binary file",
        {"suite.yaml": b"\0\1\2"},
        None,
    ),
    (
        "bench-suite-repeat-bool",
        "a suite with `repeat: true`",
        ("bench", "suite.yaml", "--dry-run"),
        "expected a number, not the boolean true",
        {"suite.yaml": SUITE + "repeat: true\n"},
        None,
    ),
    (
        "report-bad-suite",
        "report of a suite YAML that does not exist",
        ("report", "nope.yaml"),
        "suite file not found",
        {},
        None,
    ),
    (
        "report-did-not-learn",
        "report of a suite whose run ended at the majority class",
        ("report", "suite.yaml", "--results", "results"),
        "ended at or below the majority class",
        {"suite.yaml": SUITE, "results/tiny/a-r1.json": NO_LEARNING},
        None,
    ),
    (
        "plan-no-budget",
        "plan without a budget or a dynamic_rank method",
        ("plan", "train.max_steps=1"),
        "pass --memory-budget",
        {},
        None,
    ),
    (
        "train-second-file",
        "train with a second positional argument",
        ("train", "a.yaml", "b.yaml"),
        "only the first argument may be a config file",
        {"a.yaml": "task: classification\n"},
        None,
    ),
]
FLAGS = [
    ("train", ("train", "--fast")),
    ("eval", ("eval", "run", "--fast")),
    ("export", ("export", "run", "--fast")),
    ("plan", ("plan", "--fast")),
    ("bench", ("bench", "suite.yaml", "--fast")),
    ("report", ("report", "suite.yaml", "--fast")),
    ("fetch", ("fetch", "x", "--fast")),
    ("methods", ("methods", "--fast")),
]


def _cases() -> list[Case]:
    out = [
        Case(id=cid, family="cli", what=what, argv=argv, phrase=phrase, files=files, setup=setup)
        for cid, what, argv, phrase, files, setup in ROWS
    ]
    out += [
        Case(
            id=f"{cmd}-unknown-option",
            family="cli",
            what=f"`{cmd}` with an unknown option",
            argv=argv,
            phrase="unrecognized arguments: --fast",
        )
        for cmd, argv in FLAGS
    ]
    return out


CASES = _cases()
