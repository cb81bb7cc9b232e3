"""Shared fixtures: tiny random-initialised models (no download) and small learnable datasets."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

POSITIVE = ["great", "wonderful", "superb", "delightful", "brilliant", "moving", "charming", "excellent"]
NEGATIVE = ["awful", "dull", "terrible", "boring", "clumsy", "tedious", "bland", "painful"]
FILLER = ["the", "film", "was", "quite", "and", "story", "acting", "really", "plot", "it"]


def make_sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable toy task: the label is carried by one sentiment word among filler words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, 5)
        words.insert(rng.randrange(6), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append({"text": " ".join(words), "label": "pos" if label else "neg"})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


#: long checks that CI runs (CI=true) and the default `pytest` skips, so that it stays under 10 minutes on
#: 2 cores: each repeats, at a larger size, what a faster test of the same behaviour already asserts
FULL = os.environ.get("CI") == "true" or os.environ.get("LEANTUNE_FULL_TESTS") == "1"
ci_only = pytest.mark.skipif(
    not FULL, reason="a long check: runs in CI (CI=true) or with LEANTUNE_FULL_TESTS=1"
)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from leantune.models.tiny import ARCHS, build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "sentiment.csv", make_sentiment_rows(320))


@pytest.fixture
def base_overrides(tiny_models, sentiment_csv, tmp_path) -> list[str]:
    """A fast classification run on the tiny BERT: a few seconds on 2 cores."""
    return [
        f"model.name={tiny_models['bert']}",
        "model.max_length=16",
        f"data.source={sentiment_csv}",
        "train.batch_size=16",
        "train.lr=3e-3",
        "train.epochs=3",
        "train.num_threads=1",
        "train.save_every=10",
        "output.tensorboard=false",
        f"output.dir={tmp_path / 'run'}",
    ]


def cli_err(capsys, *argv) -> str:
    """Run the CLI expecting a user error: exit 2, exactly one line on stderr, no traceback."""
    from leantune.cli import main

    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit {code}, stderr: {err}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {err}"
    assert "Traceback" not in err
    return lines[0]


def assert_resume_replays(overrides: list[str], run_dir: Path, from_step: int) -> None:
    """Train `overrides` (which save a checkpoint at `from_step`), then resume as if killed right after
    that checkpoint: the resumed run must end with the uninterrupted run's weights, bit for bit."""
    from leantune.config import load_config
    from leantune.recipes.train import run_train

    full = run_train(load_config(None, overrides))
    (run_dir / "checkpoints" / "latest").write_text(f"step-{from_step:08d}")
    (run_dir / "summary.json").unlink()
    resumed = run_train(load_config(None, overrides), resume=True)
    assert resumed["train"]["resumed"]
    assert resumed["weights_sha256_per_rank"] == full["weights_sha256_per_rank"]
