"""The best evaluated weights match the step the resumed checkpoint names, and resume takes exactly the
checkpoint it checked, hashing each file once.

Regression tests for two findings of a review: a new best written just before a kill (or a resume that
fell back past a damaged checkpoint) left `best.safetensors` newer than the checkpoint's `best_step`, so
the final model was not the one the summary named; and resume chose its checkpoint up to five times,
hashing it each time, without checking that the one it loaded was the one whose identity it checked.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from leantune.errors import UserError
from leantune.train import best as best_weights
from leantune.train import checkpoint as ckpt


def _weights(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), value)}


def test_a_new_best_keeps_the_checkpointed_one_until_a_checkpoint_names_it(tmp_path: Path) -> None:
    best_weights.save(tmp_path, _weights(1.0), step=4, checkpointed=None)
    best_weights.save(tmp_path, _weights(2.0), step=8, checkpointed=4)  # the checkpoint at 4 names step 4
    assert best_weights.step_of(tmp_path / best_weights.BEST) == 8
    assert best_weights.step_of(tmp_path / best_weights.KEPT) == 4
    best_weights.checkpoint_published(tmp_path, 8)
    assert not (tmp_path / best_weights.KEPT).exists()


def test_settle_puts_back_the_checkpoints_best(tmp_path: Path) -> None:
    best_weights.save(tmp_path, _weights(1.0), step=4, checkpointed=None)
    best_weights.save(tmp_path, _weights(2.0), step=8, checkpointed=4)  # killed before the checkpoint at 8
    assert best_weights.settle(tmp_path, 4)
    assert torch.equal(load_file(str(tmp_path / best_weights.BEST))["w"], _weights(1.0)["w"])
    assert not (tmp_path / best_weights.KEPT).exists()


def test_settle_without_the_weights_forgets_the_best(tmp_path: Path, capsys) -> None:
    best_weights.save(tmp_path, _weights(2.0), step=8, checkpointed=None)
    assert not best_weights.settle(tmp_path, 4)  # step 4's weights were never kept
    assert not (tmp_path / best_weights.BEST).exists()
    assert "step 4" in capsys.readouterr().err
    best_weights.save(tmp_path, _weights(2.0), step=8, checkpointed=None)
    assert best_weights.settle(tmp_path, None) and not (tmp_path / best_weights.BEST).exists()


def test_a_best_file_of_an_older_leantune_is_trusted(tmp_path: Path) -> None:
    ckpt.save_tensors_atomic(_weights(1.0), tmp_path / best_weights.BEST)  # no recorded step
    assert best_weights.step_of(tmp_path / best_weights.BEST) is None
    assert best_weights.settle(tmp_path, 4) and (tmp_path / best_weights.BEST).exists()


class Killed(Exception):
    pass


def _kill_after_a_new_best(monkeypatch) -> dict:
    """Raise in the checkpoint save right after an evaluation replaced a best that a checkpoint names:
    the moment a kill leaves best.safetensors newer than the newest checkpoint."""
    seen: dict = {}
    save_best, save_checkpoint = best_weights.save, ckpt.save_checkpoint

    def save(run_dir, tensors, step, checkpointed):
        save_best(run_dir, tensors, step, checkpointed)
        if checkpointed is not None and checkpointed != step and "kill" not in seen:
            seen.update(kill=step, kept=checkpointed)

    def checkpoint(root, step, *args, **kwargs):
        if seen.get("kill") == step:
            raise Killed
        return save_checkpoint(root, step, *args, **kwargs)

    monkeypatch.setattr(best_weights, "save", save)
    monkeypatch.setattr(ckpt, "save_checkpoint", checkpoint)
    return seen


@pytest.fixture
def overrides(base_overrides) -> list[str]:
    return [*base_overrides, "train.eval_every=2", "train.save_every=2", "train.keep_checkpoints=100"]


def test_resume_after_a_kill_between_best_and_checkpoint_restores_the_named_best(
    overrides, tmp_path, monkeypatch
) -> None:
    from leantune.config import load_config
    from leantune.recipes.train import run_train

    seen = _kill_after_a_new_best(monkeypatch)
    with pytest.raises(Killed):
        run_train(load_config(None, overrides))
    run = tmp_path / "run"
    kept = load_file(str(run / best_weights.KEPT))
    assert best_weights.step_of(run / best_weights.BEST) == seen["kill"]
    monkeypatch.undo()
    # Resume and stop at once (max_steps = the checkpoint's step): no evaluation runs after the resume, so
    # the final model must be step `kept`'s weights, not the newer ones the kill left in best.safetensors.
    stop = f"train.max_steps={seen['kill'] - 2}"  # the checkpoint before the kill (save_every=2)
    summary = run_train(load_config(None, [*overrides, stop]), resume=True, force_resume=True)
    assert summary["train"]["best_step"] == seen["kept"]
    final = load_file(str(run / best_weights.BEST))
    assert best_weights.step_of(run / best_weights.BEST) == seen["kept"]
    assert all(torch.equal(final[k], kept[k]) for k in kept)


def test_resume_refuses_a_checkpoint_that_appeared_after_the_check(overrides, tmp_path, monkeypatch) -> None:
    from leantune.config import load_config
    from leantune.recipes import train as recipe

    recipe.run_train(load_config(None, [*overrides, "train.epochs=1"]))
    root = tmp_path / "run" / "checkpoints"
    newest = ckpt.latest_checkpoint(root)
    prepare = recipe.prepare

    def prepare_then_another_run_saves(*args, **kwargs):
        prep = prepare(*args, **kwargs)
        shutil.copytree(newest, root / "step-99999999")  # as if another run saved meanwhile
        (root / "latest").write_text("step-99999999")
        return prep

    monkeypatch.setattr(recipe, "prepare", prepare_then_another_run_saves)
    with pytest.raises(UserError, match="changed while this run was starting"):
        recipe.run_train(load_config(None, [*overrides, "train.epochs=2"]), resume=True, force_resume=True)


def test_resume_hashes_each_checkpoint_file_once(overrides, monkeypatch) -> None:
    from leantune.config import load_config
    from leantune.recipes.train import run_train

    run_train(load_config(None, [*overrides, "train.epochs=1"]))
    ckpt._DIGESTS.clear()  # as in a new process
    hashed: list[Path] = []
    hash_file = ckpt._hash_file
    monkeypatch.setattr(ckpt, "_hash_file", lambda path: hashed.append(path) or hash_file(path))
    run_train(load_config(None, [*overrides, "train.epochs=2"]), resume=True, force_resume=True)
    first_look = [p for p in hashed if "step-" in str(p)]
    assert first_look and len(first_look) == len(set(first_look))  # each file of a checkpoint once
