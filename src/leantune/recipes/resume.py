"""`leantune train --resume` that cannot go wrong quietly.

A run resumes exactly only with the config and data it was started with. Each checkpoint records both
(the resolved config and a data fingerprint); resuming with another config, a changed dataset or a
deleted `config.yaml` is refused in one line naming what differs. `--force-resume` continues anyway and
says what changed: the result is then no longer one reproducible run, and the summary records that.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from leantune.config import Config, dump_config, load_config
from leantune.data.fingerprint import fingerprint_differences
from leantune.errors import UserError, name_some

IGNORED = ("output.", "train.distributed")  # where files go / how processes cooperate: same training


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): tree}


def config_differences(saved_text: str, now_text: str, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ, e.g. `train.lr: 0.001 -> 0.002`.

    The `output` section is left out: where the run folder lives (it may have been moved) and whether
    TensorBoard logs do not change what is trained; so are the `train.distributed*` keys (DDP, FSDP or
    one process train the same steps) and the keys in `ignore`.
    """
    a, b = _flatten(yaml.safe_load(saved_text)), _flatten(yaml.safe_load(now_text))
    keys = sorted(k for k in set(a) | set(b) if not k.startswith(IGNORED) and k not in ignore)
    return [f"{k}: {a.get(k)} -> {b.get(k)}" for k in keys if a.get(k) != b.get(k)]


def _warn(message: str) -> None:
    print(f"leantune: warning: {message}", file=sys.stderr)


def _rescaled(cfg: Config, out: Path) -> tuple[str, ...]:
    """("train.batch_size",) when this launch has another number of processes than the checkpoint's and
    its batch_size keeps the checkpoint's global batch (batch_size x processes): the same run continues
    (train/checkpoint.py `check_world`)."""
    from leantune.train.checkpoint import latest_checkpoint
    from leantune.train.distributed import launch_world

    path = latest_checkpoint(out / "checkpoints")
    if path is None:
        return ()
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ()
    _, world = launch_world()
    same_global = state.get("global_batch") == cfg.train.batch_size * world
    return ("train.batch_size",) if state.get("world_size", 1) != world and same_global else ()


def load_config_text(text: str) -> Config:
    return Config.model_validate(yaml.safe_load(text))


def check_resume_config(cfg: Config, out: Path, force: bool) -> list[str]:
    """Compare the command's config with the run's `config.yaml`; return what differs when forced."""
    path = out / "config.yaml"
    if not path.is_file():
        raise UserError(
            f"{path} is missing, so leantune cannot tell which config {out} was started with; restore it "
            "or start a new run (without --resume)"
        )
    saved = load_config(path)
    if cfg.data.label_names is None:
        # The first start inferred the label names from the data and recorded them in config.yaml; the
        # same command line must resume, and must map labels to the same ids.
        cfg.data.label_names = saved.data.label_names
    diffs = config_differences(dump_config(saved), dump_config(cfg), _rescaled(cfg, out))
    listed = name_some(diffs, sep="; ")
    if diffs and not force:
        raise UserError(
            f"the config differs from the one {out} was started with ({listed}); resume with "
            f"`leantune train {path} --resume`, or add --force-resume to continue with the new config"
        )
    if diffs:
        _warn(f"resuming {out} with a changed config ({listed}): no longer one reproducible run")
    return diffs


def check_resume_identity(
    out: Path, config_text: str, fingerprint: dict, force: bool
) -> tuple[Path, list[str]]:
    """Pick the checkpoint to resume from, check that it was written with this config and data, and
    return it with what `--force-resume` let differ.

    Called once the data is loaded, before anything is written. A damaged newest checkpoint falls back to
    the newest intact one, with a warning naming what was skipped. The trainer resumes from exactly this
    checkpoint (`check_still_newest` makes sure no other appeared meanwhile).
    """
    from leantune.train.checkpoint import find_checkpoint

    path, notes = find_checkpoint(out / "checkpoints")
    if path is None:
        why = f" ({'; '.join(notes)})" if notes else ""
        raise UserError(f"nothing to resume in {out}: no intact checkpoint{why}; run without --resume")
    if notes:
        _warn(f"{'; '.join(notes)}; resuming from {path.name}, the newest intact checkpoint")
    identity = json.loads((path / "trainer_state.json").read_text(encoding="utf-8")).get("identity")
    if not identity:  # a checkpoint from before identities were recorded
        return path, []
    diffs = [f"data {d}" for d in fingerprint_differences(identity["data"], fingerprint)]
    rescaled = _rescaled(load_config_text(config_text), out)
    diffs += config_differences(identity["config"], config_text, rescaled)
    listed = name_some(diffs, sep="; ")
    if diffs and not force:
        raise UserError(
            f"checkpoint {path.name} of {out} was written with other data or config ({listed}); "
            "restore them, or add --force-resume to continue anyway"
        )
    if diffs:
        _warn(f"resuming {path.name} with changed data or config ({listed})")
    return path, diffs


def check_still_newest(out: Path, checked: Path) -> None:
    """Under the run folder's lock: the checkpoint checked while the model loaded is still the one to
    resume from. Another process may have finished or saved in the folder meanwhile; its checkpoint was
    not checked against this config and data, so the resume stops instead of taking it unseen."""
    from leantune.train.checkpoint import find_checkpoint

    now, _ = find_checkpoint(out / "checkpoints")
    if now != checked:
        raise UserError(
            f"{out} changed while this run was starting (its newest checkpoint is now "
            f"{now.name if now else 'none'}, was {checked.name}); run the same command again"
        )
