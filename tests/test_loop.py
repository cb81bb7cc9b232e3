"""Loop semantics: determinism, gradient accumulation, early stopping, mixed precision."""

from __future__ import annotations

import json

import pytest
import torch

from leantune.config import load_config
from leantune.recipes.train import prepare, run_train


def _fit(overrides: list[str]):
    prep = prepare(load_config(None, overrides))
    prep.out.mkdir(parents=True, exist_ok=True)
    trainer = prep.trainer()
    state = trainer.fit()
    return trainer, state


@pytest.fixture(scope="module")
def dropout_free_bert(tmp_path_factory):
    """Tiny BERT without dropout, so that different batchings must give the same gradients."""
    import transformers

    from leantune.models.tiny import build_tiny_model

    path = build_tiny_model("bert", tmp_path_factory.mktemp("nodrop") / "bert")
    cfg = transformers.AutoConfig.from_pretrained(path)
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
    cfg.save_pretrained(path)
    return path


def test_same_seed_same_weights_different_seed_different(base_overrides, tmp_path):
    common = [*base_overrides, "methods=[full]", "train.max_steps=8"]
    a, _ = _fit([*common, f"output.dir={tmp_path / 'a'}"])
    b, _ = _fit([*common, f"output.dir={tmp_path / 'b'}"])
    c, _ = _fit([*common, f"output.dir={tmp_path / 'c'}", "train.seed=1"])
    assert a.weights_digest() == b.weights_digest()
    assert a.weights_digest() != c.weights_digest()


def test_gradient_accumulation_matches_a_larger_batch(base_overrides, dropout_free_bert, tmp_path):
    common = [
        *base_overrides,
        f"model.name={dropout_free_bert}",
        "methods=[full]",
        "train.max_steps=6",
        "train.eval_every=1000",
        "train.group_by_length=false",  # same examples per optimizer step in both runs
    ]
    big, _ = _fit([*common, "train.batch_size=16", "train.grad_accum=1", f"output.dir={tmp_path / 'big'}"])
    acc, _ = _fit([*common, "train.batch_size=8", "train.grad_accum=2", f"output.dir={tmp_path / 'acc'}"])
    for (name, p), q in zip(big.module.named_parameters(), acc.module.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5), name


def test_early_stopping_stops_when_the_metric_stalls(base_overrides, tmp_path):
    trainer, state = _fit(
        [
            *base_overrides,
            "methods=[full]",
            "train.lr=1e-12",
            "train.epochs=20",
            "train.eval_every=2",
            "train.early_stopping_patience=2",
            "eval.metric=loss",
        ]
    )
    assert state.stopped_early
    assert state.step < trainer.total_steps
    evals = [
        json.loads(ln)
        for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"validation"' in ln
    ]
    assert len(evals) == 3  # the first sets the best, two more without improvement stop the run


def test_best_weights_are_restored_for_the_test_split(base_overrides, tmp_path):
    summary = run_train(load_config(None, [*base_overrides, "methods=[full]", "train.eval_every=3"]))
    evals = [
        json.loads(ln)
        for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"validation"' in ln
    ]
    best = max(e["accuracy"] for e in evals)
    assert summary["train"]["best_metric"] == best
    assert summary["train"]["best_step"] == next(e["step"] for e in evals if e["accuracy"] == best)


def test_bf16_autocast_trains(base_overrides, tmp_path):
    trainer, state = _fit(
        [*base_overrides, "methods=[full]", "train.mixed_precision=bf16", "train.log_every=5"]
    )
    losses = [
        json.loads(ln)["loss"]
        for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in ln and '"split"' not in ln
    ]
    assert losses[-1] < 0.8 * losses[0], losses


def test_adamw_kernels_give_the_same_weights(base_overrides, tmp_path):
    """The kernel is a speed lever only: for_loop, foreach and fused AdamW must train the same model, and
    so must `auto`, which picks the fused kernel on CPU (torch alone would run for_loop there)."""
    common = [*base_overrides, "methods=[full]", "train.max_steps=6", "train.weight_decay=0.01"]
    trained = {}
    for impl in ("for_loop", "foreach", "fused", "auto"):
        trainer, _ = _fit([*common, f"output.dir={tmp_path / impl}", f"train.adamw_impl={impl}"])
        trained[impl] = [p.detach().clone() for p in trainer.module.parameters()]
        if impl == "auto":
            assert all(g["fused"] for g in trainer.torch_optimizer.param_groups)
    start, _ = _fit([*common, f"output.dir={tmp_path / 'zero'}", "train.max_steps=1", "train.lr=1e-12"])
    moved = max(
        (a - b).abs().max().item()
        for a, b in zip(trained["for_loop"], start.module.parameters(), strict=True)
    )
    assert moved > 1e-4  # the steps did move the weights, so equality below means something
    for impl in ("foreach", "fused", "auto"):
        diff = max(
            (a - b).abs().max().item() for a, b in zip(trained["for_loop"], trained[impl], strict=True)
        )
        assert diff < 1e-6, (impl, diff)
