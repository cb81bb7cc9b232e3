"""The scale-out suite's table and plot: throughput, scaling efficiency, and each run's per-rank peak beside
`leantune plan --world-size N`'s prediction for the same config.

    leantune bench scale-out && PYTHONPATH=src python benchmarks/scale_out_table.py

Reads benchmarks/results/scale-out/*-r1.json (the runner's artefacts), runs the plan's memory model on
each run's own overrides (the model is loaded and its activations traced, as `leantune plan` does), and
writes benchmarks/results/scale-out/table.json (docs/distributed.md quotes it through fig markers) and
scale-out.png.

Scaling efficiency here is throughput(N) / throughput(1) on the SAME cores: the suite splits its 2
threads over the processes (4 processes oversubscribe the 2 cores), so perfect scaling is 1.0, not N;
it shows what the processes' communication and duplicated work cost, not added hardware.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path("benchmarks/results/scale-out")
MiB = 2**20


_LOADED: dict[tuple, tuple] = {}


def predict(overrides: list[str], processes: int) -> dict:
    """`leantune plan --world-size` for the run's own overrides; the model is loaded once per job (the
    runs of a job differ only in batch size and mode)."""
    from leantune.config import load_config
    from leantune.recipes.plan import check_world_args, load_for_rank_plan, rank_plan

    cfg = load_config(None, overrides)
    mode, batch = check_world_args(cfg, processes, None, None)
    job = tuple(
        o for o in overrides if not o.startswith(("train.batch_size=", "train.distributed=", "train.num"))
    )
    if job not in _LOADED:
        _LOADED.clear()  # one model in memory at a time
        _LOADED[job] = load_for_rank_plan(cfg)
    model, seq_len, shape = _LOADED[job]
    return rank_plan(model, cfg, processes, mode, batch, seq_len, shape)


def row(artefact: dict) -> dict:
    memory = artefact["memory"]
    procs = artefact.get("processes") or {"count": 1, "threads_each": 2, "oversubscribed": False}
    plan = predict(artefact["overrides"], procs["count"])
    measured = max(memory["model_peak_bytes_per_rank"])
    sharded = plan["weights"] + plan["gradients"] + plan["optimizer_state"]
    return {
        "run": artefact["run_id"],
        "processes": procs["count"],
        "threads_each": procs["threads_each"],
        "oversubscribed": procs["oversubscribed"],
        "samples_per_s": artefact["samples_per_s"],
        "tokens_per_s": artefact["tokens_per_s"],
        "train_time_s": artefact["train_time_s"],
        "wall_time_s": artefact["wall_time_s"],
        "load_1min": ((artefact.get("machine") or {}).get("load_avg_1m_5m_15m") or [None])[0],
        "measured_peak_mib": measured / MiB,
        "measured_peak_per_rank_mib": [b / MiB for b in memory["model_peak_bytes_per_rank"]],
        "library_pages_mib": max(memory["library_growth_per_rank"]) / MiB,
        "predicted_peak_mib": plan["total"] / MiB,
        "predicted_peak_at": plan["peak_at"],
        "predicted_peak_phase": plan["peak_phase"],
        "predicted_moments_mib": {k: v / MiB for k, v in plan["moments"].items()},
        "predicted_load_mib": plan["load"] / MiB,
        "prediction_error": (plan["total"] - measured) / measured,
        "sharded_state_mib": sharded / MiB,
        "one_process_state_mib": (
            plan["one_process"]["weights"]
            + plan["one_process"]["gradients"]
            + plan["one_process"]["optimizer_state"]
        )
        / MiB,
    }


def main() -> int:
    artefacts = sorted(RESULTS.glob("*-r1.json"))
    if not artefacts:
        print(f"no artefacts in {RESULTS}: run `leantune bench scale-out` first", file=sys.stderr)
        return 2
    rows = {}
    for path in artefacts:
        artefact = json.loads(path.read_text())
        rows[artefact["run_id"]] = row(artefact)
        r = rows[artefact["run_id"]]
        print(
            f"{r['run']:<18} {r['samples_per_s']:7.2f} samples/s  peak {r['measured_peak_mib']:7.1f} MiB "
            f"predicted {r['predicted_peak_mib']:7.1f} MiB ({r['prediction_error']:+.1%})",
            flush=True,
        )
    for r in rows.values():
        base = rows.get(r["run"].rsplit("-p", 1)[0] + "-p1")
        r["scaling_efficiency"] = r["samples_per_s"] / base["samples_per_s"] if base else None
    errors = [abs(r["prediction_error"]) for r in rows.values()]
    deepspeed = deepspeed_status()
    print(f"DeepSpeed ZeRO-2/3: {deepspeed}")
    out = {
        "deepspeed": deepspeed,
        "rows": rows,
        "max_abs_prediction_error": max(errors),
        "within_15pct": sum(e <= 0.15 for e in errors),
        "runs": len(errors),
    }
    (RESULTS / "table.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(rows)
    return 0


def deepspeed_status() -> str:
    """Why the DeepSpeed ZeRO-2/3 rows are missing (or that they could run): ZeRO through accelerate needs
    CUDA GPUs and the deepspeed package, and this suite is not set up to add them on a CPU machine."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return "skipped: no CUDA GPU on this machine (DeepSpeed ZeRO runs on GPUs only)"
    if importlib.util.find_spec("deepspeed") is None:
        return "skipped: the deepspeed package is not installed (pip install deepspeed==0.19.8)"
    return "available but not part of this suite's runs"


def plot(rows: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    families = sorted({r.rsplit("-p", 1)[0] for r in rows})
    for i, family in enumerate(families):
        runs = sorted(
            (r for r in rows.values() if r["run"].startswith(family + "-p")), key=lambda r: r["processes"]
        )
        n = [r["processes"] for r in runs]
        left.plot(n, [r["scaling_efficiency"] for r in runs], "o-", color=f"C{i}", label=family)
        right.plot(n, [r["measured_peak_mib"] for r in runs], "o-", color=f"C{i}", label=f"{family} measured")
        right.plot(n, [r["predicted_peak_mib"] for r in runs], "x--", color=f"C{i}", alpha=0.7)
    left.set(
        xlabel="processes (2 threads in all)", ylabel="throughput / 1-process throughput", xticks=[1, 2, 4]
    )
    left.axhline(1.0, color="grey", lw=0.5)
    left.set_title("scaling efficiency on the same 2 cores")
    right.set(xlabel="processes", ylabel="per-rank peak (MiB)", xticks=[1, 2, 4], yscale="log")
    right.set_title("per-rank peak: measured (o) vs plan (x)")
    left.legend(fontsize=8)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "scale-out.png", dpi=90)


if __name__ == "__main__":
    sys.exit(main())
