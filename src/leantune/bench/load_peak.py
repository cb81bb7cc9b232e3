"""The memory a quantised base costs while it loads: process peak RSS, one fresh process per setting.

Settings, each through leantune's own loading code:
- `fp32`: the base in full precision (no quant), the reference;
- `swap_4bit` / `swap_8bit`: the path before load-time quantisation: the base loads in full precision,
  then `quant` replaces its linear layers (what `methods.quant` does with `backend: torch` or a
  blocksize other than 64);
- `load_4bit` / `load_8bit`: `quant`'s `load_options` (a BitsAndBytesConfig): transformers quantises each
  weight as it reads it.

Measured after the load (and quantisation) and one forward pass, over the process after its imports
(torch, transformers, bitsandbytes, with bitsandbytes' CPU kernels loaded by quantising one small
layer, in every setting alike): the growth of peak RSS (VmHWM; it counts the file pages of weights that
transformers keeps memory-mapped) and of private memory (RssAnon, its peak sampled every 2 ms). Each
model is measured from its shipped fp32 safetensors and from a bf16 copy (how hub checkpoints usually
come; weights converted to fp32 cannot stay memory-mapped). glibc's mmap threshold is fixed (`ALLOCATOR`).
Linux only (/proc/self/status).

    python -m leantune.bench.load_peak --out benchmarks/results/quant-load/load_peak.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# transformers loads weights from a thread pool; glibc gives each thread its own heap and keeps what is
# freed there, so under the default allocator the same load peaked at 270 or 405 MiB from run to run. With
# a fixed mmap threshold every large tensor is its own mapping, returned when freed, and RSS follows the
# live tensors (as in bench/memory_validation.py): repeated runs agree within 1 MiB.
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "131072"}
MODELS = {"embedded:minilm": "classification", "embedded:smollm2": "causal_lm"}
SETTINGS = ("fp32", "swap_4bit", "load_4bit", "swap_8bit", "load_8bit")


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class _AnonPeak:
    """The peak of RssAnon (private memory, not the file pages of memory-mapped weights), sampled every
    2 ms in a thread: /proc has no high-water mark for it."""

    def __init__(self) -> None:
        import threading

        self.peak = _status_kib("RssAnon") * 1024
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _status_kib("RssAnon") * 1024)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status_kib("RssAnon") * 1024)


def measure_one(model_name: str, task: str, setting: str, path: str) -> dict:
    """Load the model in folder `path` as `setting` says and run one forward pass (every weight touched:
    memory-mapped fp32 weights are only read then), in this fresh process; bytes and seconds."""
    import bitsandbytes  # noqa: F401  (imported before the baseline in every setting)
    import torch
    import transformers  # noqa: F401

    from leantune.methods.quant import QuantConfig, load_options, quantize
    from leantune.models.loader import load_model

    _warm_up_bitsandbytes()
    labels = ["neg", "pos"] if task == "classification" else None
    baseline, baseline_anon = _status_kib("VmRSS") * 1024, _status_kib("RssAnon") * 1024
    anon = _AnonPeak()
    t0 = time.perf_counter()
    if setting == "fp32":
        model = load_model(path, task, "float32", labels)
    else:
        cfg = QuantConfig(bits=4 if setting.endswith("4bit") else 8)
        options = load_options(cfg, task, "float32") if setting.startswith("load") else None
        model = quantize(load_model(path, task, "float32", labels, options=options), cfg)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        model(input_ids=torch.ones(1, 16, dtype=torch.long))
    anon_peak = anon.stop()
    peak, after = _status_kib("VmHWM") * 1024, _status_kib("VmRSS") * 1024
    return {
        "model": model_name,
        "task": task,
        "setting": setting,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "load_peak_bytes": peak - baseline,
        "resident_after_bytes": after - baseline,
        "anon_peak_bytes": anon_peak - baseline_anon,
        "anon_after_bytes": _status_kib("RssAnon") * 1024 - baseline_anon,
        "load_seconds": seconds,
        "stored_parameters": sum(p.numel() for p in model.parameters()),
    }


def _warm_up_bitsandbytes() -> None:
    """bitsandbytes' CPU backend loads its kernels on first use (tens of MiB, whatever the model size):
    quantise one small layer both ways before the baseline, in every setting alike."""
    import bitsandbytes as bnb
    import torch

    for layer in (bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32), bnb.nn.Linear8bitLt(64, 64)):
        layer.weight = type(layer.weight)(torch.randn(64, 64), requires_grad=False)
        layer.to("cpu")(torch.randn(2, 64))


def run_one(model_name: str, task: str, setting: str, path: str, threads: int = 1) -> dict:
    """`measure_one` in a fresh interpreter (a process's peak never falls, so one setting per process)."""
    cmd = [sys.executable, "-m", "leantune.bench.load_peak", "--one", model_name, task, setting, path]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", **ALLOCATOR}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{model_name} {setting} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def checkpoint_folders(model_name: str, task: str, tmp: Path) -> dict[str, str]:
    """The model's folder as it ships (fp32 safetensors here) and a bf16 copy (how hub checkpoints
    usually come): loading bf16 weights as fp32 converts them, so they cannot stay memory-mapped."""
    from leantune.models.loader import load_model, load_tokenizer, resolve_model_path

    shipped = resolve_model_path(model_name)
    bf16 = tmp / model_name.split(":")[-1]
    if not (bf16 / "config.json").is_file():
        model = load_model(shipped, task, "bfloat16", ["neg", "pos"] if task == "classification" else None)
        model.save_pretrained(str(bf16))
        load_tokenizer(shipped).save_pretrained(str(bf16))
        del model
    return {"fp32": shipped, "bf16": str(bf16)}


def run_all(out: Path, models: list[str], tmp: Path) -> dict:
    rows = {}
    for name in models:
        task = MODELS[name]
        for ckpt, path in checkpoint_folders(name, task, tmp).items():
            for setting in SETTINGS:
                row = {**run_one(name, task, setting, path), "checkpoint_dtype": ckpt}
                rows[f"{name.split(':')[-1]}_{ckpt}_{setting}"] = row
                print(
                    f"{name:<17} {ckpt} ckpt {setting:<10} "
                    f"peak RSS +{row['load_peak_bytes'] / 2**20:6.1f} MiB  "
                    f"anon peak +{row['anon_peak_bytes'] / 2**20:6.1f} MiB  anon after "
                    f"+{row['anon_after_bytes'] / 2**20:6.1f} MiB  {row['load_seconds']:.1f} s",
                    flush=True,
                )
    result = {
        "what": "memory while the base model loads (and is quantised) and runs one forward pass, over the "
        "process after imports: growth of peak RSS (VmHWM, file pages of memory-mapped weights included) "
        "and of private memory (RssAnon, sampled every 2 ms); one fresh process per setting",
        "load_1min": os.getloadavg()[0],
        "machine_note": "a shared 2-core CPU machine (other work running)",
        "allocator": ALLOCATOR,
        "rows": rows,
        "command": "python -m leantune.bench.load_peak --out " + str(out),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/quant-load/load_peak.json"))
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--tmp", type=Path, default=Path("/tmp/leantune-load-peak"), help="bf16 copies")
    p.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if ns.one:
        print(json.dumps(measure_one(*ns.one)))
        return
    run_all(ns.out, ns.models, ns.tmp)


if __name__ == "__main__":
    main()
