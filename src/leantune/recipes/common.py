"""Pieces the recipes share: seeding/threads, label resolution, loading a finished run, reporting."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

from leantune.config import Config, load_config
from leantune.errors import UserError

VERSIONED = ("leantune", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors")


def setup_torch(seed: int, threads: int | None) -> None:
    import torch
    from accelerate.utils import set_seed

    if threads:
        torch.set_num_threads(threads)
    set_seed(seed)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in VERSIONED:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def machine() -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
    }
    if hasattr(os, "getloadavg"):
        # Timings are only comparable on a quiet machine: record how busy it was when the run ended.
        info["load_avg_1m_5m_15m"] = [round(x, 2) for x in os.getloadavg()]
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    return info


def count_params(model) -> dict[str, float]:
    """In logical weights: a packed 4-bit parameter counts the weights it holds, not its bytes."""
    from leantune.models.quantized import logical_numel

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(logical_numel(p) for p in model.parameters())
    return {"trainable": trainable, "total": total, "trainable_pct": 100.0 * trainable / max(total, 1)}


def load_run_config(run_dir: Path) -> Config:
    """The config of a *finished* run (eval and export need its saved model)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(
            f"{run_dir} is not a leantune run (no config.yaml); pass a folder `leantune train` made"
        )
    if not (run_dir / "model").is_dir():
        raise UserError(f"{run_dir} has no saved model (model/); did the run finish? resume it with --resume")
    return load_config(path)


def load_trained_model(run_dir: Path, cfg: Config):
    """The run's final model: base + PEFT adapter where the run saved one, else the full saved model.

    Methods with a `reload` hook first rebuild on the base what the saved weights do not hold (the
    quantised base of a `[quant, lora]` run), so the adapter is scored on the model it was trained on.
    """
    from leantune.models.loader import load_model

    folder = run_dir / "model"
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        base = _reload_methods(
            load_model(cfg.model.name, cfg.task, cfg.model.dtype, cfg.data.label_names), cfg, run_dir
        )
        model = PeftModel.from_pretrained(base, str(folder))
        _keep_extra_saves(base, model)
        return model
    model = load_model(str(folder), cfg.task, cfg.model.dtype, cfg.data.label_names)
    return _reload_methods(model, cfg, run_dir)


def _keep_extra_saves(base, wrapper) -> None:
    """What a reload hook re-attached outside peft's weights (e.g. bottleneck adapters) must still be
    written when the PeftModel on top saves (`leantune export`): hooks list such writers on the base."""
    from leantune.methods.registry import extend_save

    for write in getattr(base, "leantune_save_extras", None) or ():
        extend_save(wrapper, write)


def _reload_methods(model, cfg: Config, run_dir: Path):
    from leantune.methods import get_method

    for mcfg in cfg.methods:
        spec = get_method(mcfg.name)
        if spec.reload is not None:
            model = spec.reload(model, mcfg, run_dir)
    return model


def format_table(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * max(len(title), width + 20)]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)
