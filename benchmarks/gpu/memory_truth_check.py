"""Memory truth on a real GPU (issue 19, item 5): a tiny dynamic_rank job on CUDA under a memory budget,
printing every step's measured CUDA peak (torch.cuda.max_memory_allocated, reset at each step start, the
figure the budget controller reads) against the budget and the memory model's estimate.

    python benchmarks/gpu/memory_truth_check.py                       # on CUDA: MiniLM-L6, RT, 30 steps
    python benchmarks/gpu/memory_truth_check.py --cpu                 # dry run on CPU: tiny BERT, 6 steps
    python benchmarks/gpu/memory_truth_check.py --budget 300MiB 1GiB --out memory_truth.json

Why a script and not a test: CI has no GPU. The CPU dry run exercises the same path (there the meter's
figure is the persistent part plus RSS growth) so the script itself is known to work before a GPU lease.
Exit status 1 when any step's measured peak exceeds its budget.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

_PEAKS: list[int] = []  # the current run's step peaks


def _record_steps() -> None:
    """Keep every step's peak as the trainer's meter reads it (the runtime only logs the max per check).
    Installed once: each run clears `_PEAKS` first."""
    from leantune.memory.measure import StepPeakMeter

    if getattr(StepPeakMeter.stop, "records", False):
        return
    stop = StepPeakMeter.stop

    def recording(self):
        peak = stop(self)
        if peak is not None:
            _PEAKS.append(peak if self.cuda else self.last_growth)
        return peak

    recording.records = True
    StepPeakMeter.stop = recording


def derived(result: dict) -> dict:
    """Figures the docs quote: the largest step peak, how many steps went over, peak / estimate."""
    peaks, budget = result["step_peaks_bytes"], result["budget_bytes"]
    return {
        "max_step_peak_mib": max(peaks) / 2**20,
        "estimate_mib": result["estimate_bytes"] / 2**20,
        "budget_mib": budget / 2**20,
        "steps": len(peaks),
        "steps_over_budget": (over := [i + 1 for i, peak in enumerate(peaks) if peak > budget]),
        "steps_over_budget_count": len(over),
        "last_step_over_budget": max(over, default=0),
        "max_peak_over_estimate": max(peaks) / result["estimate_bytes"],
    }


def run_one(budget: str, cpu: bool, steps: int, root: Path) -> dict:
    from leantune.config import load_config
    from leantune.errors import UserError
    from leantune.recipes.train import run_train

    if cpu:
        from leantune.models.tiny import build_tiny_model

        model = str(build_tiny_model("bert", root / "tiny-bert"))
        extra = ["model.max_length=32", "train.num_threads=2"]
    else:
        model, extra = "embedded:minilm", ["model.max_length=128"]
    method = {
        "name": "dynamic_rank",
        "budget": budget,
        "target_modules": ["query", "value", "intermediate.dense"],
        "realloc_every": max(2, steps // 3),
        "probe_batches": 2,
    }
    overrides = [
        f"model.name={model}",
        "data.source=builtin:rotten_tomatoes",
        "data.max_train_samples=2048",
        "data.max_eval_samples=256",
        f"methods=[{json.dumps(method)}]",
        f"train.max_steps={steps}",
        "train.batch_size=32",
        "train.lr=1e-3",
        "train.save_every=null",
        "output.tensorboard=false",
        f"output.dir={root / ('run-' + budget)}",
        *extra,
    ]
    _PEAKS.clear()
    _record_steps()
    try:
        summary = run_train(load_config(None, overrides))
    except UserError as exc:
        return {"budget": budget, "error": str(exc)}
    report = summary["method_reports"]["dynamic_rank"]
    budget_bytes = report["budget_bytes"]
    peaks = list(_PEAKS)
    result = {
        "budget": budget,
        "budget_bytes": budget_bytes,
        "device": "cpu" if cpu else "cuda",
        "source": report["measured_peak_source"],
        "estimate_bytes": report["plan"]["estimate"]["total"],
        "step_peaks_bytes": peaks,
        "measured_peak_bytes": report["measured_peak_bytes"],
        # CUDA: every step's max_memory_allocated; CPU: the controller's figure (persistent + growth)
        "within_budget": bool(peaks)
        and (report["measured_peak_bytes"] if cpu else max(peaks)) <= budget_bytes,
        "ranks": report["ranks"],
        "reallocations": report["reallocations"],
        "memory": summary["memory"],
        "test_accuracy": summary["test"].get("accuracy"),
    }
    return result | derived(result)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="dry run on CPU with a tiny random BERT")
    ap.add_argument(
        "--budget", nargs="+", default=None, help="budgets to run (default: 300MiB 1GiB; CPU 64MiB)"
    )
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default 30; CPU 6)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu for the dry run", file=sys.stderr)
        return 2
    if args.cpu:
        import os

        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the dry run stays on CPU even on a GPU machine
    budgets = args.budget or (["64MiB"] if args.cpu else ["300MiB", "1GiB"])
    steps = args.steps or (6 if args.cpu else 30)
    results = []
    with tempfile.TemporaryDirectory(prefix="memory-truth-") as tmp:
        for budget in budgets:
            r = run_one(budget, args.cpu, steps, Path(tmp))
            results.append(r)
            if "error" in r:
                print(f"budget {budget}: refused: {r['error']}")
                continue
            mib = 2**20
            shown = ", ".join(f"{p / mib:.1f}" for p in r["step_peaks_bytes"])
            print(
                f"budget {budget} = {r['budget_bytes'] / mib:.1f} MiB on {r['device']} ({r['source']}): "
                f"estimate {r['estimate_bytes'] / mib:.1f} MiB, "
                + ("CUDA step peaks" if r["device"] == "cuda" else "RSS growth per step")
                + f" (MiB) [{shown}], controller's peak {r['measured_peak_bytes'] / mib:.1f} MiB -> "
                f"{'within' if r['within_budget'] else 'OVER'} "
                f"budget; process peak RSS {r['memory']['peak_rss_bytes'] / mib:.0f} MiB"
                + (
                    f", CUDA lifetime max allocated {r['memory']['cuda_max_allocated_bytes'] / mib:.1f} MiB"
                    if "cuda_max_allocated_bytes" in r["memory"]
                    else ""
                )
                + f"; ranks {sorted(set(r['ranks'].values()))}, {r['reallocations']} re-allocations"
            )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "device": torch.cuda.get_device_name(0) if not args.cpu else "cpu",
                    "torch": torch.__version__,
                    "results": results,
                },
                indent=2,
            )
        )
    ran = [r for r in results if "error" not in r]
    return 0 if ran and all(r["within_budget"] for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
