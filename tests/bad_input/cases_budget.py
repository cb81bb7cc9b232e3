"""Numbers: non-finite, coerced (bool, quoted, fractional where whole) or absurd values, refused at
config time for every numeric key; memory budgets for dynamic_rank, `leantune plan` and
the frozen-prefix cache's RAM bound."""

from __future__ import annotations

from tests.bad_input.harness import Case, train, with_data

FINITE = "must be a finite number"
# key, kind, lower-bound phrase for -1
FLOAT_KEYS = [
    ("train.lr", "greater than 0"),
    ("train.weight_decay", "greater than or equal to 0"),
    ("train.warmup_ratio", "greater than or equal to 0"),
    ("train.max_grad_norm", "greater than 0"),
    ("train.adam_epsilon", "greater than 0"),
    ("train.momentum", "greater than or equal to 0"),
    ("data.validation_fraction", "greater than or equal to 0"),
    ("data.test_fraction", "greater than or equal to 0"),
    ("methods.0.alpha", "greater than 0"),
    ("methods.0.dropout", "greater than or equal to 0"),
]
INT_KEYS = [
    ("train.epochs", "greater than 0"),
    ("train.max_steps", "greater than 0"),
    ("train.batch_size", "greater than 0"),
    ("train.grad_accum", "greater than 0"),
    ("train.warmup_steps", "greater than or equal to 0"),
    ("train.lr_cycles", "greater than 0"),
    ("train.seed", "greater than or equal to 0"),
    ("train.num_threads", "greater than 0"),
    ("train.log_every", "greater than 0"),
    ("train.eval_every", "greater than 0"),
    ("train.save_every", "greater than 0"),
    ("train.keep_checkpoints", "greater than 0"),
    ("train.early_stopping_patience", "greater than 0"),
    ("model.max_length", "greater than 0"),
    ("data.split_seed", "greater than or equal to 0"),
    ("data.max_train_samples", "greater than 0"),
    ("data.max_eval_samples", "greater than 0"),
    ("eval.batch_size", "greater than 0"),
    ("eval.max_new_tokens", "greater than 0"),
    ("eval.num_beams", "greater than 0"),
    ("methods.0.r", "greater than 0"),
]
# value as typed on the command line, short id, phrase (None: the key's lower-bound phrase)
COMMON = [
    (".inf", "inf", FINITE),
    ("-.inf", "neginf", FINITE),
    (".nan", "nan", FINITE),
    ("true", "true", "expected a number, not the boolean true"),
    ("-1", "minus1", None),
]
FLOAT_ONLY = [("1e400", "1e400", FINITE), ("ten", "text", "expected a number")]
INT_ONLY = [
    ("2.5", "frac", "expected a whole number"),
    ("'8'", "quoted", "expected a number, not text"),
    ("false", "false", "expected a number, not the boolean false"),
]


def _override(key: str, value: str) -> tuple[str, ...]:
    if key.startswith("methods.0."):
        return ("methods=[lora]", f"{key}={value}")
    return (f"{key}={value}",)


def _cases() -> list[Case]:
    out = []
    for keys, extra in ((FLOAT_KEYS, FLOAT_ONLY), (INT_KEYS, INT_ONLY)):
        for key, lower in keys:
            for value, vid, phrase in COMMON + extra:
                out.append(
                    Case(
                        id=f"{key}={vid}",
                        family="budget",
                        what=f"`{key}: {value}`",
                        argv=train(*_override(key, value)),
                        phrase=f"'{key}': input should be {lower}"
                        if phrase is None
                        else f"'{key}': {phrase}",
                        files=with_data(),
                    )
                )
    absurd = [
        ("train.seed", "1180591620717411303424", "seed 2**70", "less than or equal to 4294967295"),
        ("data.split_seed", "4294967296", "split seed 2**32", "less than or equal to 4294967295"),
        ("train.lr", "2", "a learning rate of 2", "less than or equal to 1"),
        ("train.lr", "1e9", "a learning rate of 1e9", "less than or equal to 1"),
        ("train.epochs", "0", "zero epochs", "greater than 0"),
        ("train.batch_size", "1.0", "a batch size of 1.0", "expected a whole number"),
        ("output.tensorboard", "1", "1 for a boolean", "expected true or false"),
        ("train.group_by_length", "'yes'", "quoted yes for a boolean", "expected true or false"),
    ]
    for key, value, what, phrase in absurd:
        out.append(
            Case(
                id=f"absurd-{key}={value[:12]}",
                family="budget",
                what=what,
                argv=train(f"{key}={value}"),
                phrase=phrase,
                files=with_data(),
            )
        )
    budgets = [
        ("1e400", "1e400", "not a finite memory size"),
        (".nan", "nan", FINITE),
        (".inf", "inf", FINITE),
        ("-1", "minus1", "must be positive"),
        ("0", "zero", "must be positive"),
        ("true", "true", "not the boolean true"),
        ("2e15", "2e15", "more than a petabyte"),
        ("'3 XB'", "unit", "not a memory size"),
        ("'-2GiB'", "negunit", "not a memory size"),
    ]
    for value, vid, phrase in budgets:
        out.append(
            Case(
                id=f"dynamic_rank.budget={vid}",
                family="budget",
                what=f"dynamic_rank `budget: {value}`",
                argv=train(f"methods=[{{name: dynamic_rank, budget: {value}}}]"),
                phrase=phrase,
                files=with_data(),
            )
        )
    for value, vid, phrase in budgets:
        out.append(
            Case(
                id=f"prefix_cache_ram={vid}",
                family="budget",
                what=f"`train.prefix_cache_ram={value}` (the frozen-prefix cache's RAM bound)",
                argv=train("train.cache_frozen_prefix=true", f"train.prefix_cache_ram={value}"),
                phrase=phrase,
                files=with_data(),
            )
        )
    plan_budgets = [
        ("1e400", "not a finite memory size"),
        ("nan", "not a memory size"),
        ("inf", "not a memory size"),
        ("-1", "not a memory size"),
        ("0", "must be positive"),
        ("2e15", "more than a petabyte"),
        ("3XB", "not a memory size"),
        ("", "not a memory size"),
        ("1.5.2GiB", "not a memory size"),
    ]
    for value, phrase in plan_budgets:
        out.append(
            Case(
                id=f"plan--memory-budget={value or 'empty'}",
                family="budget",
                what=f"`leantune plan --memory-budget '{value}'`",
                argv=("plan", "@BASE@", f"--memory-budget={value}"),
                phrase=phrase,
                files=with_data(),
            )
        )
    # `leantune plan --world-size N`: refused before anything is loaded
    world = [
        ("plan-world-size-0", "`leantune plan --world-size 0`", ("--world-size", "0"), "at least 1"),
        ("plan-world-size-negative", "`leantune plan --world-size -2`", ("--world-size=-2"), "at least 1"),
        (
            "plan-world-size-global-batch-indivisible",
            "`leantune plan --world-size 3 --global-batch 16` (16 rows do not divide over 3 processes)",
            ("--world-size", "3", "--global-batch", "16"),
            "use a multiple of 3",
        ),
        (
            "plan-world-size-global-batch-0",
            "`leantune plan --world-size 2 --global-batch 0`",
            ("--world-size", "2", "--global-batch", "0"),
            "--global-batch must be at least 1",
        ),
        (
            "plan-global-batch-alone",
            "`leantune plan --global-batch 16` without --world-size",
            ("--global-batch", "16"),
            "only applies with --world-size",
        ),
        (
            "plan-world-size-with-budget",
            "`leantune plan --world-size 2 --memory-budget 1GiB` (two different questions)",
            ("--world-size", "2", "--memory-budget", "1GiB"),
            "pass one of them",
        ),
        (
            "plan-world-size-distributed-none",
            "`leantune plan train.distributed=none --world-size 2`",
            ("train.distributed=none", "--world-size", "2"),
            "train.distributed=none runs one process",
        ),
        (
            "plan-world-size-not-a-number",
            "`leantune plan --world-size two`",
            ("--world-size", "two"),
            "invalid int value",
        ),
    ]
    for case_id, what, extra, phrase in world:
        extra = (extra,) if isinstance(extra, str) else extra
        out.append(
            Case(
                id=case_id,
                family="budget",
                what=what,
                argv=("plan", "@BASE@", *extra),
                phrase=phrase,
                files=with_data(),
            )
        )
    return out


CASES = _cases()
