"""Optimisers and schedules (`train.optimizer`, `train.lr_scheduler` and their keys): unknown names,
keys of another optimizer, impossible combinations, a warmup longer than the run, and optimizers this
machine or launch cannot run."""

from __future__ import annotations

import torch

from tests.bad_input.harness import Case, train, with_data

# id, what, overrides, phrase
ROWS: list[tuple[str, str, tuple[str, ...], str]] = [
    ("unknown-optimizer", "an unknown optimizer name", ("train.optimizer=adam_w",), "train.optimizer"),
    (
        "unknown-scheduler",
        "an unknown schedule name",
        ("train.lr_scheduler=cosine_annealing",),
        "lr_scheduler",
    ),
    ("negative-lr", "a negative learning rate", ("train.lr=-1e-3",), "greater than 0"),
    ("momentum-adamw", "`momentum` with AdamW", ("train.momentum=0.9",), "applies to optimizer sgd"),
    (
        "nesterov-no-momentum",
        "Nesterov SGD without momentum",
        ("train.optimizer=sgd", "train.nesterov=true"),
        "needs train.momentum > 0",
    ),
    (
        "betas-sgd",
        "Adam betas with SGD",
        ("train.optimizer=sgd", "train.adam_beta2=0.99"),
        "applies to optimizer",
    ),
    (
        "impl-adafactor",
        "an AdamW kernel with Adafactor",
        ("train.optimizer=adafactor", "train.adamw_impl=fused"),
        "applies to optimizer adamw",
    ),
    ("beta-one", "adam_beta2=1 (no decay)", ("train.adam_beta2=1",), "less than 1"),
    ("cycles-linear", "`lr_cycles` with the linear schedule", ("train.lr_cycles=3",), "cosine_with_restarts"),
    (
        "warmup-over-max-steps",
        "warmup_steps above max_steps",
        ("train.warmup_steps=5",),
        "exceeds train.max_steps=2",
    ),
    (
        "warmup-over-run",
        "warmup_steps above the run's steps (epochs, no max_steps)",
        ("train.max_steps=null", "train.epochs=1", "train.warmup_steps=100"),
        "optimizer steps of this run",
    ),
    (
        "mezo-optimizer",
        "mezo with an optimizer it ignores",
        ("methods=[mezo]", "train.optimizer=sgd"),
        "does not use train.optimizer",
    ),
    (
        "lomo-optimizer",
        "lomo with an optimizer it ignores",
        ("methods=[lomo]", "train.optimizer=adafactor"),
        "does not use train.optimizer",
    ),
    (
        "adalomo-betas",
        "adalomo with Adam betas it ignores",
        ("methods=[adalomo]", "train.adam_beta1=0.8"),
        "does not use train.adam_beta1",
    ),
    (
        "dynamic-rank-optimizer",
        "dynamic_rank with an optimizer whose moments it cannot carry",
        ("methods=[{name: dynamic_rank, budget: 1GiB}]", "train.optimizer=sgd"),
        "set train.optimizer=adamw",
    ),
    ("lr-word", "a learning rate that is neither a number nor auto", ("train.lr=fast",), "number or auto"),
    (
        "lr-auto-keys-fixed-lr",
        "a range-test key with a fixed learning rate",
        ("train.lr_auto_steps=20",),
        "applies to train.lr=auto",
    ),
    (
        "lr-auto-range-inverted",
        "a range test whose start is not below its end",
        ("train.lr=auto", "train.lr_auto_min=1e-2", "train.lr_auto_max=1e-3"),
        "is not below train.lr_auto_max",
    ),
    (
        "lr-auto-steps-few",
        "a range test of fewer than 5 steps",
        ("train.lr=auto", "train.lr_auto_steps=2"),
        "greater than or equal to 5",
    ),
    (
        "lr-auto-mezo",
        "lr auto with mezo (its own update)",
        ("methods=[mezo]", "train.lr=auto"),
        "train.lr=auto cannot run here",
    ),
    (
        "lr-auto-lomo",
        "lr auto with lomo (update inside backward)",
        ("methods=[lomo]", "train.lr=auto"),
        "train.lr=auto cannot run here",
    ),
    (
        "lr-auto-lisa",
        "lr auto with lisa (stateful step hooks)",
        ("methods=[lisa]", "train.lr=auto"),
        "train.lr=auto cannot run here",
    ),
]


def _no_cuda() -> str | None:
    return "this machine has CUDA: paged optimizers run" if torch.cuda.is_available() else None


def _no_bitsandbytes(env) -> None:
    """A machine without bitsandbytes: its import spec is missing."""
    import importlib.util

    real = importlib.util.find_spec
    env.monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )


CASES = [
    Case(id=f"optim-{cid}", family="optim", what=what, argv=train(*extra), phrase=phrase, files=with_data())
    for cid, what, extra, phrase in ROWS
] + [
    Case(
        id="optim-paged-on-cpu",
        family="optim",
        what="a paged optimizer on a machine without CUDA",
        argv=train("train.optimizer=paged_adamw_8bit"),
        phrase="has no CUDA GPU",
        files=with_data(),
        skip=_no_cuda,
    ),
    Case(
        id="optim-8bit-without-bitsandbytes",
        family="optim",
        what="an 8-bit optimizer on a machine without bitsandbytes",
        argv=train("train.optimizer=adamw_8bit"),
        phrase="pip install",
        files=with_data(),
        setup=_no_bitsandbytes,
    ),
]
