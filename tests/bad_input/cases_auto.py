"""`methods: auto` and `leantune plan --auto` (recipes/auto.py): auto listed beside other methods, a
budget nothing fits (train and plan), a malformed budget, and plan flags that do not apply to --auto."""

from __future__ import annotations

from tests.bad_input.harness import Case, train, with_data

NOTHING_FITS = "nothing fits the memory budget"


def _cases() -> list[Case]:
    return [
        Case(
            id="methods-auto-with-lora",
            family="config",
            what="`methods: [auto, lora]` (auto chooses the whole list)",
            argv=train("methods=[auto, lora]"),
            phrase="cannot be combined with lora",
            files=with_data(),
        ),
        Case(
            id="methods-auto-dict-with-freeze",
            family="config",
            what="`methods: [{name: freeze, layers: 1}, {name: auto, budget: 2GiB}]`",
            argv=train("methods=[{name: freeze, layers: 1}, {name: auto, budget: 2GiB}]"),
            phrase="cannot be combined with freeze",
            files=with_data(),
        ),
        Case(
            id="methods-auto-budget-malformed",
            family="budget",
            what="`methods: [{name: auto, budget: lots}]`",
            argv=train("methods=[{name: auto, budget: lots}]"),
            phrase="not a memory size",
            files=with_data(),
        ),
        Case(
            id="methods-auto-nothing-fits",
            family="budget",
            what="`methods: [{name: auto, budget: 1MiB}]` on a model no candidate fits in 1 MiB",
            argv=train("methods=[{name: auto, budget: 1MiB}]"),
            phrase=NOTHING_FITS,
            files=with_data(),
        ),
        Case(
            id="methods-auto-task-dpo",
            family="config",
            what="`methods: auto` with task dpo (its reference model is not priced)",
            argv=train("task=dpo", "methods=auto"),
            phrase="methods: auto does not price what task dpo holds",
            files=with_data(),
        ),
        Case(
            id="plan-auto-nothing-fits",
            family="budget",
            what="`leantune plan --auto --memory-budget 1MiB` (no candidate fits)",
            argv=("plan", "@BASE@", "--auto", "--memory-budget", "1MiB"),
            phrase=NOTHING_FITS,
            files=with_data(),
        ),
        Case(
            id="plan-auto-budget-malformed",
            family="budget",
            what="`leantune plan --auto --memory-budget 3XB`",
            argv=("plan", "@BASE@", "--auto", "--memory-budget", "3XB"),
            phrase="--memory-budget: ",
            files=with_data(),
        ),
        Case(
            id="plan-auto-world-size",
            family="budget",
            what="`leantune plan --auto --world-size 2` (auto plans one process)",
            argv=("plan", "@BASE@", "--auto", "--world-size", "2"),
            phrase="--auto plans one process",
            files=with_data(),
        ),
        Case(
            id="plan-auto-allow-recompute",
            family="budget",
            what="`leantune plan --auto --allow-recompute` (the flag shapes the LoRA rank plan only)",
            argv=("plan", "@BASE@", "--auto", "--allow-recompute"),
            phrase="not --auto's choice",
            files=with_data(),
        ),
    ]


CASES = _cases()
