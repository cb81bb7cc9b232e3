"""What a run sets up and records about itself: seed and threads, library versions, the machine, and
parameter counts. Shared by `leantune train` (recipes) and the HF baseline (bench), so both set up and
report the same way; `leantune.recipes.common` re-exports these names.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform

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
