"""Pieces the recipes share: loading a finished run, reporting; seeding/threads, versions, machine and
parameter counts come from `leantune.train.run_info` and the console table from `leantune.train.summary`
(the HF baseline in `bench` needs them too)."""

from __future__ import annotations

from pathlib import Path

from leantune.config import Config, load_config
from leantune.errors import UserError
from leantune.train.run_info import VERSIONED, count_params, machine, setup_torch, versions
from leantune.train.summary import format_table

__all__ = [
    "VERSIONED",
    "count_params",
    "format_table",
    "load_run_config",
    "load_trained_model",
    "machine",
    "setup_torch",
    "versions",
]


def load_run_config(run_dir: Path, finished: bool = True) -> Config:
    """The config of a run; of a *finished* one unless `finished=False` (eval and export need its model)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(
            f"{run_dir} is not a leantune run (no config.yaml); pass a folder `leantune train` made"
        )
    if finished and not (run_dir / "model").is_dir():
        raise UserError(f"{run_dir} has no saved model (model/); did the run finish? resume it with --resume")
    return load_config(path)


def load_trained_model(run_dir: Path, cfg: Config):
    """The run's final model: base + PEFT adapter where the run saved one, else the full saved model.

    Methods with a `reload` hook first rebuild on the base what the saved weights do not hold (the
    quantised base of a `[quant, lora]` run), so the adapter is scored on the model it was trained on;
    `after_load` hooks then restore what loading the adapter does not.
    """
    from leantune.models.loader import load_model

    folder = run_dir / "model"
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        base = reload_methods(load_base(cfg), cfg, run_dir)
        model = PeftModel.from_pretrained(base, str(folder))
        _keep_extra_saves(base, model)
        return _with_task_hooks(_after_load(model, cfg), cfg)
    model = load_model(str(folder), cfg.task, cfg.model.dtype, cfg.data.label_names)
    return _with_task_hooks(reload_methods(model, cfg, run_dir), cfg)


def _with_task_hooks(model, cfg: Config):
    """A reward model scores preference pairs (the Bradley-Terry loss hooks of models/reward.py); a
    prompt classifier scores its label words (models/prompt_head.py); a DPO policy is scored against its
    reference, the base model (models/dpo.py)."""
    if cfg.task == "reward":
        from leantune.models.reward import attach_pair_loss

        attach_pair_loss(model)
    if cfg.task == "prompt_classification":
        from leantune.models.loader import load_tokenizer
        from leantune.models.prompt_head import setup_label_words

        setup_label_words(model, load_tokenizer(cfg.model.name), cfg.data, cfg.model.name)
    if cfg.task == "dpo":
        from leantune.models.dpo import attach_dpo_loss, has_adapter
        from leantune.models.loader import load_model

        base = None if has_adapter(model) else load_model(cfg.model.name, "dpo", cfg.model.dtype)
        attach_dpo_loss(model, cfg.dpo.beta, reference=base)
    return model


def _after_load(model, cfg: Config):
    from leantune.methods import get_method

    for mcfg in cfg.methods:
        spec = get_method(mcfg.name)
        if spec.after_load is not None:
            model = spec.after_load(model, mcfg)
    return model


def _keep_extra_saves(base, wrapper) -> None:
    """What a reload hook re-attached outside peft's weights (e.g. bottleneck adapters) must still be
    written when the PeftModel on top saves (`leantune export`): hooks list such writers on the base."""
    from leantune.methods.registry import extend_save

    for write in getattr(base, "leantune_save_extras", None) or ():
        extend_save(wrapper, write)


def load_base(cfg: Config):
    """The run's base model, loaded as training loaded it (the methods' `load_options`: a base quantised
    at load time is quantised at load time again)."""
    from leantune.methods.registry import load_options
    from leantune.models.loader import load_model

    options = load_options(cfg.methods, cfg.task, cfg.model.dtype)
    return load_model(cfg.model.name, cfg.task, cfg.model.dtype, cfg.data.label_names, options=options)


def reload_methods(model, cfg: Config, run_dir: Path):

    from leantune.methods import get_method

    for mcfg in cfg.methods:
        spec = get_method(mcfg.name)
        if spec.reload is not None:
            model = spec.reload(model, mcfg, run_dir)
    return model


def write_new_output(out: Path, text: str) -> None:
    """An output file the user named (`--out`): written atomically and never over a file, not even one
    that appeared after the up-front check (one line then, and nothing of theirs is touched)."""
    from leantune.atomic import write_new_text

    try:
        write_new_text(out, text)
    except FileExistsError:
        raise UserError(
            f"--out {out} appeared while this command ran; it was left as it is: pass another --out"
        ) from None
