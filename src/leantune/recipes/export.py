"""`leantune export RUN_DIR [--merge] [--out DIR]`: a plain HF model folder anyone can load.

With --merge the LoRA update is folded into the base weights (peft's merge_and_unload), so the result
loads with `AutoModelFor*.from_pretrained` and runs at base-model speed. Without it the adapter is
written as peft saved it. The destination must not exist: export never overwrites. A run on a quantised
base (`[quant, lora]`) is refused --merge: its codes cannot absorb the update, and merging onto the
unquantised weights would give a model that was never trained or evaluated; its adapter exports as is.
Bottleneck adapters and peft's prompt/prefix methods are refused --merge too: they are not a change of
the base weights. Without --merge they export as the run saved them (base or peft adapter, plus the
method's own files, e.g. adapters.safetensors + adapters.json).
"""

from __future__ import annotations

from pathlib import Path

from leantune.atomic import write_folder_atomic
from leantune.errors import UserError
from leantune.recipes.common import load_run_config, load_trained_model


def run_export(run_dir: Path, merge: bool, out: Path | None = None) -> Path:
    cfg = load_run_config(run_dir)
    dest = out or run_dir / ("merged" if merge else "exported")
    if dest.exists():
        raise UserError(f"{dest} already exists; pass another --out (export never overwrites)")
    from leantune.models.loader import load_tokenizer

    model = load_trained_model(run_dir, cfg)
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
    tok = load_tokenizer(str(run_dir / "model"))  # the run's tokenizer, not the base's

    def write(folder: Path) -> None:
        model.save_pretrained(str(folder))
        tok.save_pretrained(str(folder))

    write_folder_atomic(dest, write)  # nothing half-written is left behind
    print(f"exported {'merged model' if merge else 'model'} to {dest}")
    return dest
