"""`leantune export RUN_DIR [--merge] [--out DIR]`: a plain HF model folder anyone can load.

With --merge the LoRA update is folded into the base weights (peft's merge_and_unload), so the result
loads with `AutoModelFor*.from_pretrained` and runs at base-model speed. Without it the adapter is
written as peft saved it. `--checkpoint step-N` exports that checkpoint instead of the final model (also
of a run still training or killed): its adapter where the run is a peft model, else the base model with
the checkpoint's trained weights. The destination must not exist: export never overwrites. A run on a
quantised base (`[quant, lora]`) is refused --merge: its codes cannot absorb the update, and merging onto
the unquantised weights would give a model that was never trained or evaluated; its adapter exports as
is.
Bottleneck adapters and peft's prompt/prefix methods are refused --merge too: they are not a change of
the base weights. Without --merge they export as the run saved them (base or peft adapter, plus the
method's own files, e.g. adapters.safetensors + adapters.json).
"""

from __future__ import annotations

from pathlib import Path

from leantune.atomic import write_folder_atomic
from leantune.errors import UserError
from leantune.outputs import check_new_folder
from leantune.recipes.common import load_run_config, load_trained_model


def run_export(run_dir: Path, merge: bool, out: Path | None = None, checkpoint: str | None = None) -> Path:
    cfg = load_run_config(run_dir, finished=checkpoint is None)
    source = checkpoint_folder(run_dir, checkpoint) if checkpoint else run_dir
    default = ("merged" if merge else "exported") + (f"-{source.name}" if checkpoint else "")
    dest = out or run_dir / default
    check_new_folder(dest, "--out")
    from leantune.models.loader import load_tokenizer

    model = (
        load_trained_model(source, cfg)
        if (source / "model").is_dir()
        else _with_checkpoint_weights(source, cfg)
    )
    if merge and any(hasattr(m, "leantune_source_dtype") for m in model.modules()):  # a quantised layer
        raise UserError(
            f"{run_dir} trained on a quantised base, whose 4/8-bit codes cannot absorb the LoRA update: "
            "export without --merge and merge the adapter onto the unquantised base"
        )
    unmergeable = next(
        (m.leantune_unmergeable for m in model.modules() if hasattr(m, "leantune_unmergeable")), None
    )
    if merge and unmergeable:
        raise UserError(f"{run_dir} cannot be exported with --merge: {unmergeable}; export without --merge")
    if merge and getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        raise UserError(
            f"{run_dir} cannot be exported with --merge: its learned prompt/prefix is an input to the model, "
            "not a change of the base weights; export without --merge"
        )
    if merge and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    saved = run_dir / "model"  # the run's tokenizer once it finished; checkpoints hold none: the base's
    tok = load_tokenizer(str(saved) if saved.is_dir() else cfg.model.name)

    def write(folder: Path) -> None:
        model.save_pretrained(str(folder))
        tok.save_pretrained(str(folder))

    try:
        write_folder_atomic(dest, write, replace=False)  # nothing half-written is left behind
    except FileExistsError:
        raise UserError(
            f"{dest} appeared while exporting; it was left as it is: pass another --out"
        ) from None
    print(f"exported {'merged model' if merge else 'model'} to {dest}")
    return dest


def checkpoint_folder(run_dir: Path, name: str) -> Path:
    """`step-N` (or `N`) of the run's checkpoints, intact; else one line naming the ones there are."""
    from leantune.train.checkpoint import STEP_NAME, checkpoint_damage

    root = run_dir / "checkpoints"
    steps = (
        sorted(p.name for p in root.glob("step-*") if STEP_NAME.fullmatch(p.name)) if root.is_dir() else []
    )
    wanted = f"step-{int(name):08d}" if name.isdigit() else name
    if not STEP_NAME.fullmatch(wanted) or wanted not in steps:
        have = ", ".join(steps[-5:]) or "none"
        raise UserError(f"{run_dir} has no checkpoint {name!r}; its newest checkpoints: {have}")
    damage = checkpoint_damage(root / wanted)
    if damage:
        raise UserError(f"checkpoint {wanted} of {run_dir} is damaged ({damage}); export another one")
    return root / wanted


def _with_checkpoint_weights(folder: Path, cfg):
    """The base model with the trainable weights of checkpoint `folder` (full or partial fine-tuning);
    an FSDP checkpoint's shards are joined into whole tensors."""
    from leantune.recipes.common import load_base, reload_methods
    from leantune.train.checkpoint import load_trainable_state, read_trainable

    model = reload_methods(load_base(cfg), cfg, folder)
    load_trainable_state(model, read_trainable(folder))
    return model
