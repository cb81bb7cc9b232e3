"""Check the memory model against measured peaks over a grid of settings, one fresh process each.

What is compared: the model's *step* bytes (gradients + optimizer state + saved activations + transient
buffers) against the growth of the process's peak resident set over two optimizer steps: VmHWM after
resetting it (`echo 5 > /proc/self/clear_refs`) minus VmRSS at that moment. Before that baseline the
model is loaded, methods applied, the optimizer built, and one forward and backward pass at the full
size has run without the optimizer: libraries keep per-shape workspace from their first call, which is
recorded apart as `rss_first_fwd_bwd_delta` and not counted in the step. The weights are compared
separately (RSS growth while loading vs the model's parameter bytes). On CUDA the same step bytes are
compared with `torch.cuda.max_memory_allocated` growth.

It lives in `bench` (it was `leantune.memory.validate`): it applies methods and builds the trainer's
optimizer, which the memory model below the methods must not import.

    python -m leantune.bench.memory_validation --out benchmarks/results/memory-model/validation.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

GRID_METHODS = {
    "lora_r8_qv": [{"name": "lora", "r": 8}],
    "lora_r64_all": [{"name": "lora", "r": 64, "target_modules": "all-linear"}],
    "full": [{"name": "full"}],
}
# glibc keeps freed heap memory and raises its mmap threshold after frees, so by default RSS holds on to
# freed activations and a later step reuses them without growing: the step's RSS growth under-reads. With
# a fixed threshold every large tensor is its own mapping, returned when freed, and RSS follows the live
# tensors: that is the setting the model is held to (15%). Under the default allocator the first full
# forward + backward pass (before any reuse) is compared instead, with the optimizer state left out.
ALLOCATORS = {"glibc-default": {}, "glibc-mmap128k": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
MMAP, DEFAULT = "glibc-mmap128k", "glibc-default"
GRID = (
    [
        {"method": "lora_r8_qv", "batch_size": b, "seq_len": s, "recompute": False, "allocator": MMAP}
        for b in (4, 16)
        for s in (64, 128)
    ]
    + [
        {"method": "lora_r64_all", "batch_size": 4, "seq_len": s, "recompute": False, "allocator": MMAP}
        for s in (64, 128)
    ]
    + [
        {"method": "full", "batch_size": b, "seq_len": s, "recompute": False, "allocator": MMAP}
        for b, s in ((4, 64), (4, 128), (16, 64))
    ]
    + [{"method": "full", "batch_size": 4, "seq_len": 128, "recompute": True, "allocator": MMAP}]
    # activation-dominated settings, where recomputation's rule (block inputs + the largest block) and
    # the wide adapters' saved inputs decide the estimate
    + [
        {"method": "lora_r8_qv", "batch_size": 16, "seq_len": 128, "recompute": True, "allocator": MMAP},
        {"method": "lora_r64_all", "batch_size": 16, "seq_len": 64, "recompute": False, "allocator": MMAP},
        {"method": "full", "batch_size": 16, "seq_len": 128, "recompute": False, "allocator": MMAP},
    ]
    + [
        {"method": "lora_r8_qv", "batch_size": 16, "seq_len": 128, "recompute": False, "allocator": DEFAULT},
        {"method": "full", "batch_size": 4, "seq_len": 128, "recompute": False, "allocator": DEFAULT},
    ]
)


def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1))


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_one(setting: dict, model_name: str, threads: int) -> dict:
    """Measure one grid setting (a warm-up, then two steady optimizer steps) beside the memory model's
    estimate for the same model, batch and sequence length."""
    import torch

    from leantune.memory.estimate import estimate_memory, gradient_checkpointing, probe_batch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, optimizer, weights_rss_delta = _load_for_setting(setting, model_name)
    b, s = setting["batch_size"], setting["seq_len"]
    with gradient_checkpointing(model, setting["recompute"]):
        batch = probe_batch(model, "classification", b, s)
        first_step = _warm_up(model, optimizer, batch)
        steady, step_s = _measure_steps(model, optimizer, batch)
    measured = {
        "rss_step_delta": steady["rss_step_delta"],
        "hwm_reset": steady["hwm_reset"],
        "rss_first_fwd_bwd_delta": first_step,
        **({"cuda_step_delta": steady["cuda_step_delta"]} if "cuda_step_delta" in steady else {}),
    }
    est = estimate_memory(model, "classification", b, s, "adamw", setting["recompute"])
    return {
        **setting,
        "estimate": est.totals(),
        "measured": measured,
        "weights_rss_delta": weights_rss_delta,
        "step_s": step_s,
    }


def _load_for_setting(setting: dict, model_name: str):
    """The model with the setting's methods applied (on the GPU where there is one), in train mode, its
    optimizer, and the RSS that loading the weights took."""
    import torch

    from leantune.methods import MethodContext, apply_methods
    from leantune.methods.registry import method_config_class
    from leantune.models.loader import load_model
    from leantune.train.optim import build_optimizer

    rss0 = _status_kib("VmRSS") * 1024
    model = load_model(model_name, "classification", "float32", ["neg", "pos"])
    rss_loaded = _status_kib("VmRSS") * 1024
    configs = [method_config_class(m["name"])(**m) for m in GRID_METHODS[setting["method"]]]
    model = apply_methods(model, configs, MethodContext(task="classification", seed=0))
    if torch.cuda.is_available():
        model = model.cuda()
    model.train()
    return model, build_optimizer(model, 1e-4, 0.0), rss_loaded - rss0


def _warm_up(model, optimizer, batch) -> int:
    """One forward/backward at the full size, without the optimizer, and the RSS it added: libraries
    (oneDNN, MKL) keep per-shape workspace from their first call, measured here apart from the
    steady-state step."""
    import gc

    gc.collect()
    warm_base = _status_kib("VmRSS") * 1024
    _reset_peak()
    model(**batch).loss.backward()
    optimizer.zero_grad(set_to_none=True)
    return _status_kib("VmHWM") * 1024 - warm_base


def _measure_steps(model, optimizer, batch) -> tuple[dict, float]:
    """Two full optimizer steps from a settled baseline: the peak RSS (and CUDA) above it, and the mean
    seconds per step."""
    import gc

    import torch

    cuda = torch.cuda.is_available()
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    baseline = _status_kib("VmRSS") * 1024
    reset = _reset_peak()
    t0 = time.perf_counter()
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step_s = (time.perf_counter() - t0) / 2
    peak = _status_kib("VmHWM") * 1024
    measured = {"rss_step_delta": peak - baseline, "hwm_reset": reset}
    if cuda:
        measured["cuda_step_delta"] = torch.cuda.max_memory_allocated() - cuda_base
    return measured, step_s


def _error(est: int, measured: int) -> float:
    return (est - measured) / measured if measured else float("nan")


def _with_errors(row: dict) -> dict:
    est, measured = row["estimate"], row["measured"]
    # The step estimate from its parts, as MemoryEstimate.step_bytes combines them (rows measured before
    # the update temporaries were modelled lack them: LoRA rows, where they are < 2 MiB and never the max).
    first_formula = est["gradients"] + est["optimizer_state"] + est["activations"] + est["transient"]
    update = est["gradients"] + est.get("optimizer_transient", 0)
    est["step"] = est["optimizer_state"] + max(est["activations"] + est["transient"], update)
    row["error_first_formula"] = _error(first_formula, measured["rss_step_delta"])
    if row["allocator"] == "glibc-mmap128k":
        row["compared"] = "step vs rss_step_delta"
        row["error"] = _error(est["step"], measured["rss_step_delta"])
    else:
        row["compared"] = "max(activations + transient, gradients) vs rss_first_fwd_bwd_delta"
        first_pass = max(est["activations"] + est["transient"], est["gradients"])  # no optimizer yet
        row["error"] = _error(first_pass, measured["rss_first_fwd_bwd_delta"])
    row["error_weights"] = _error(est["weights"], row["weights_rss_delta"])
    if "cuda_step_delta" in measured:
        row["error_step_cuda"] = _error(est["step"], measured["cuda_step_delta"])
    return row


def run_grid(out: Path, model_name: str, threads: int, only: list[int] | None) -> dict:
    """Runs each setting in a fresh process; finished rows are kept in OUT.rows.jsonl (a rerun resumes)."""
    partial = out.with_suffix(".rows.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    done_rows = [json.loads(line) for line in partial.read_text().splitlines()] if partial.exists() else []
    keys = {json.dumps({k: r[k] for k in GRID[0]}, sort_keys=True) for r in done_rows}
    for i, setting in enumerate(GRID):
        if (only and i not in only) or json.dumps(setting, sort_keys=True) in keys:
            continue
        cmd = [sys.executable, "-m", "leantune.bench.memory_validation", "--one", json.dumps(setting)]
        cmd += ["--model", model_name, "--threads", str(threads)]
        env = {**os.environ, **ALLOCATORS[setting["allocator"]]}
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"setting {setting} failed:\n{done.stderr[-3000:]}")
        row = _with_errors(json.loads(done.stdout.strip().splitlines()[-1]))
        with partial.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        done_rows.append(row)
        print(_format_row(row), flush=True)
    rows = [_with_errors(r) for r in done_rows]
    result = {
        "what": "estimated step bytes (grads + optimizer + activations + transient) vs measured growth of "
        "peak RSS, fresh process per setting; see `compared` per row and the module docstring",
        "model": model_name,
        "threads": threads,
        "rows": rows,
        "errors": {
            a: {
                "max_abs_error": max((abs(r["error"]) for r in rows if r["allocator"] == a), default=None),
                "mean_abs_error": sum(abs(r["error"]) for r in rows if r["allocator"] == a)
                / max(1, sum(r["allocator"] == a for r in rows)),
                "settings": sum(r["allocator"] == a for r in rows),
            }
            for a in ALLOCATORS
        },
        "command": "python -m leantune.bench.memory_validation --out " + str(out),
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(error_table(result))
    return result


def _format_row(r: dict) -> str:
    mib = 2**20
    return (
        f"{r['allocator']:<15} {r['method']:<13} b={r['batch_size']:<3} L={r['seq_len']:<4} "
        f"recompute={str(r['recompute']):<5} est {r['estimate']['step'] / mib:8.1f} MiB  "
        f"measured step {r['measured']['rss_step_delta'] / mib:8.1f} MiB, first pass "
        f"{r['measured']['rss_first_fwd_bwd_delta'] / mib:8.1f} MiB  error {100 * r['error']:+6.1f}%"
    )


def error_table(result: dict) -> str:
    mib = 2**20
    lines = [
        f"# Memory model vs measured ({result['model']}, {result['threads']} threads)",
        "",
        result["what"] + ".",
        "",
        "| allocator | method | batch | seq | recompute | grads+opt MiB | activations MiB | transient MiB | "
        "estimate (step) MiB | measured step MiB | measured first pass MiB | compared | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        e, m = r["estimate"], r["measured"]
        lines.append(
            f"| {r['allocator']} | {r['method']} | {r['batch_size']} | {r['seq_len']} | {r['recompute']} | "
            f"{(e['gradients'] + e['optimizer_state']) / mib:.1f} | {e['activations'] / mib:.1f} | "
            f"{e['transient'] / mib:.1f} | {e['step'] / mib:.1f} | {m['rss_step_delta'] / mib:.1f} | "
            f"{m['rss_first_fwd_bwd_delta'] / mib:.1f} | {r['compared']} | {100 * r['error']:+.1f}% |"
        )
    lines.append("")
    for allocator, e in result["errors"].items():
        if e["settings"]:
            lines.append(
                f"- {allocator} ({e['settings']} settings): max |error| {100 * e['max_abs_error']:.1f}%, "
                f"mean |error| {100 * e['mean_abs_error']:.1f}%"
            )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/memory-model/validation.json"))
    p.add_argument("--model", default="embedded:minilm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", type=int, nargs="+", help="indices into the grid")
    p.add_argument("--one", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if ns.one:
        print(json.dumps(measure_one(json.loads(ns.one), ns.model, ns.threads)))
        return
    run_grid(ns.out, ns.model, ns.threads, ns.only)


if __name__ == "__main__":
    main()
