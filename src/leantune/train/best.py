"""The best evaluated weights, kept consistent with the checkpoint a run resumes from.

`best.safetensors` holds the trainable weights of the best evaluation so far and records that
evaluation's step in its metadata. A checkpoint records `best_step` too, but the two are written at
different moments: a new best at step M replaces the file before the checkpoint at M is published. A
kill in between (or a resume that falls back past a damaged checkpoint) resumes with `best_step` B < M
while the file holds M's weights; restoring them at the end would hand over weights newer than the step
the summary names (and, after `--force-resume`, weights of another trajectory).

So while the newest published checkpoint names B, B's weights are kept aside as
`best-checkpointed.safetensors` when a newer best replaces `best.safetensors`, and dropped once a
checkpoint names the new best. On resume, `settle` puts back the file whose step the checkpoint names.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

BEST = "best.safetensors"
KEPT = "best-checkpointed.safetensors"


def step_of(path: Path) -> int | None:
    """The step recorded in a best-weights file; None when absent, unreadable or from an older leantune."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            step = (fh.metadata() or {}).get("step")
    except (OSError, ValueError, RuntimeError):  # missing or not a safetensors file
        return None
    return int(step) if step is not None and step.isdigit() else None


def save(run_dir: Path, tensors: dict, step: int, checkpointed: int | None) -> None:
    """Write step's best weights; first keep aside the ones the newest checkpoint names, if replaced."""
    from leantune.train.checkpoint import save_tensors_atomic

    best, kept = run_dir / BEST, run_dir / KEPT
    if checkpointed is not None and checkpointed != step and step_of(best) == checkpointed:
        os.replace(best, kept)
    save_tensors_atomic(tensors, best, {"step": str(step)})


def checkpoint_published(run_dir: Path, best_step: int | None) -> None:
    """A checkpoint naming `best_step` is published: weights kept for an older one are no longer needed."""
    kept = run_dir / KEPT
    if kept.exists() and step_of(kept) != best_step:
        kept.unlink()


def settle(run_dir: Path, best_step: int | None) -> bool:
    """Make `best.safetensors` hold the weights of the resumed checkpoint's `best_step`.

    Returns False when those weights are gone (then the caller forgets the old best and says so). A file
    without a recorded step (written by an older leantune) is trusted as before.
    """
    best, kept = run_dir / BEST, run_dir / KEPT
    if best_step is None:  # files from evaluations after the checkpoint: the replay writes them again
        best.unlink(missing_ok=True)
        kept.unlink(missing_ok=True)
        return True
    if best.exists() and step_of(best) in (best_step, None):
        kept.unlink(missing_ok=True)
        return True
    if kept.exists() and step_of(kept) == best_step:
        os.replace(kept, best)
        return True
    best.unlink(missing_ok=True)
    kept.unlink(missing_ok=True)
    print(
        f"leantune: warning: the best weights (step {best_step}) of the resumed checkpoint are gone; "
        "the final model is the best of the evaluations from here on",
        file=sys.stderr,
    )
    return False
