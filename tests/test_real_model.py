"""The embedded default on real weights and real data (slow: about a minute on 2 cores)."""

from __future__ import annotations

import pytest

from leantune.config import load_config
from leantune.recipes.train import run_train

pytestmark = pytest.mark.slow


def test_default_lora_job_on_a_subset_beats_majority(tmp_path):
    summary = run_train(
        load_config(
            None,
            [
                "data.max_train_samples=2048",
                "data.max_eval_samples=512",
                "train.lr=3e-3",
                f"output.dir={tmp_path / 'run'}",
                "output.tensorboard=false",
            ],
        )
    )
    test = summary["test"]
    assert test["accuracy"] >= test["majority_accuracy"] + 0.1, test
    # peft's default for BERT: LoRA on query and value of 6 blocks (r=8, A and B) + the 2-class head.
    assert summary["params"]["trainable"] == 6 * 2 * 8 * (384 + 384) + (384 * 2 + 2)
