"""`leantune export RUN_DIR [--merge] [--out DIR]`: a plain HF model folder anyone can load.

With --merge the LoRA update is folded into the base weights (peft's merge_and_unload), so the result
loads with `AutoModelFor*.from_pretrained` and runs at base-model speed. Without it the adapter is
written as peft saved it. The destination must not exist: export never overwrites.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from leantune.errors import UserError
from leantune.recipes.common import load_run_config, load_trained_model


def run_export(run_dir: Path, merge: bool, out: Path | None = None) -> Path:
    cfg = load_run_config(run_dir)
    dest = out or run_dir / ("merged" if merge else "exported")
    if dest.exists():
        raise UserError(f"{dest} already exists; pass another --out (export never overwrites)")
    from leantune.models.loader import load_tokenizer

    model = load_trained_model(run_dir, cfg)
    if merge and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp))
        load_tokenizer(str(run_dir / "model")).save_pretrained(str(tmp))  # the run's tokenizer, not the base
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left behind
    print(f"exported {'merged model' if merge else 'model'} to {dest}")
    return dest
