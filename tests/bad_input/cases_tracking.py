"""Experiment trackers (`output.report_to`): unknown names, `none` among trackers, a tracker twice, and
trackers whose package is missing (refused before any model loads)."""

from __future__ import annotations

from tests.bad_input.harness import Case, Env, train, with_data

ROWS: list[tuple[str, str, tuple[str, ...], str]] = [
    ("unknown", "a misspelt tracker", ("output.report_to=tensorbord",), "did you mean 'tensorboard'?"),
    (
        "unknown-in-list",
        "an unknown tracker in a list",
        ("output.report_to=[tensorboard, comet]",),
        "unknown tracker 'comet'",
    ),
    (
        "none-and-more",
        "`none` beside a tracker",
        ("output.report_to=[none, wandb]",),
        "'none' cannot be combined",
    ),
    ("twice", "a tracker listed twice", ("output.report_to=[tensorboard, tensorboard]",), "listed twice"),
    ("number", "a number", ("output.report_to=3",), "valid list"),
]


def _missing(package: str):
    """A machine without `package`: its import spec is missing."""

    def setup(env: Env) -> None:
        import importlib.util

        real = importlib.util.find_spec
        env.monkeypatch.setattr(
            importlib.util, "find_spec", lambda n, *a: None if n == package else real(n, *a)
        )

    return setup


CASES = [
    Case(
        id=f"tracker-{cid}",
        family="tracking",
        what=what,
        argv=train(*extra),
        phrase=phrase,
        files=with_data(),
    )
    for cid, what, extra, phrase in ROWS
] + [
    Case(
        id=f"tracker-missing-{name}",
        family="tracking",
        what=f"report_to {name} without the {name} package",
        argv=train("output.tensorboard=true", f"output.report_to={name}"),
        phrase=f"pip install {name}",
        files=with_data(),
        setup=_missing(name),
    )
    for name in ("wandb", "mlflow", "trackio", "tensorboard")
]
