"""`leantune bench SUITE`: every (run, repeat) in a fresh subprocess, one JSON artefact each.

Why a fresh subprocess per run: peak RSS is a per-process lifetime maximum, allocator caches and
torch's thread pools carry over, and the first run in a process pays for imports and warm-up; only a
clean process gives every run the same start. The run's own summary.json is the source of truth; the
runner adds the matmul peak measured once at the start of this invocation, so every ratio in a report
compares runs measured side by side.

A finished artefact is skipped unless `--rerun`, so a killed suite continues where it stopped (the
artefact is written atomically after the run, so a half-finished run leaves nothing and is redone).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from leantune.atomic import copy_atomic, write_json_atomic
from leantune.bench.artefact import artefact_path, build_artefact, metrics_path, read_artefact
from leantune.bench.suite import PlannedRun, Suite, load_suite, plan, resolve_suite_path, threads_per_process
from leantune.errors import UserError
from leantune.outputs import check_output_root

DEFAULT_RESULTS = Path("benchmarks/results")
_MODULE = {"leantune": ["leantune", "train"], "hf_baseline": ["leantune.bench.hf_baseline"]}


def child_command(run: PlannedRun, run_dir: Path) -> list[str]:
    """The run's command line: `python -m leantune train ...`, under torchrun for `processes: N > 1`
    (`--standalone`: a free rendezvous port, so runs of other suites on the machine do not collide)."""
    launcher = ["-m"]
    if run.spec.processes > 1:
        torchrun = ["torch.distributed.run", "--standalone", "--nproc-per-node", str(run.spec.processes)]
        launcher = ["-m", *torchrun, "-m"]
    return [
        sys.executable,
        *launcher,
        *_MODULE[run.spec.kind],
        *run.overrides,
        f"output.dir={run_dir}",
        "output.overwrite=true",
    ]


def run_env(suite: Suite, run: PlannedRun) -> dict[str, str]:
    return {**suite.env, **run.spec.env}


def child_env(threads: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    env.update(extra or {})
    return env


def run_bench(
    suite_arg: str,
    *,
    results: Path | None = None,
    repeat: int | None = None,
    rerun: bool = False,
    only: Sequence[str] | None = None,
    extra: Sequence[str] = (),
    dry_run: bool = False,
    work: Path | None = None,
) -> list[Path]:
    """Run the suite; return the artefact paths of every planned (run, repeat), fresh or reused."""
    check_output_root(results or DEFAULT_RESULTS, "--results")
    if work is not None:
        check_output_root(work, "--work")
    suite = load_suite(resolve_suite_path(suite_arg))
    runs = plan(suite, extra, only, repeat)  # validates every run's config before anything starts
    folder = (results or DEFAULT_RESULTS) / suite.name
    check_output_root(folder, "--results")
    todo = [r for r in runs if rerun or read_artefact(artefact_path(folder, r.key)) is None]
    if dry_run:
        _print_plan(suite, runs, todo, folder)
        return [artefact_path(folder, r.key) for r in runs]
    folder.mkdir(parents=True, exist_ok=True)
    print(
        f"suite {suite.name}: {len(runs)} runs, {len(runs) - len(todo)} already finished "
        f"(--rerun to redo them); results in {folder}",
        flush=True,
    )
    if todo:
        from leantune.bench.peak import matmul_peak

        invocation = f"{time.strftime('%Y-%m-%dT%H:%M:%S')}-{os.getpid()}"
        peak = matmul_peak(suite.threads)
        print(
            f"matmul peak ({suite.threads} threads, {peak['size']}^2): {peak['fp32_gflops']:.0f} GFLOP/s "
            f"fp32, {peak['bf16_gflops']:.0f} GFLOP/s bf16",
            flush=True,
        )
        for i, run in enumerate(todo, 1):
            _run_one(suite, run, folder, peak, invocation, work, f"[{i}/{len(todo)}]")
    return [artefact_path(folder, r.key) for r in runs]


def _run_one(
    suite: Suite, run: PlannedRun, folder: Path, peak: dict, invocation: str, work: Path | None, tag: str
) -> None:
    import json

    from leantune.bench.peak import flops_report

    scratch = Path(tempfile.mkdtemp(prefix=f"leantune-bench-{run.key}-")) if work is None else work
    run_dir = scratch / run.key
    log_path = scratch / f"{run.key}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = child_command(run, run_dir)
    print(f"{tag} {run.key} ({run.spec.kind}) ...", end=" ", flush=True)
    t0 = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as log:
        env = child_env(threads_per_process(suite.threads, run.spec.processes), run_env(suite, run))
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode
    wall = time.perf_counter() - t0
    summary_path = run_dir / "summary.json"
    if rc != 0 or not summary_path.is_file():
        print("failed", flush=True)
        lines = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        why = lines[-1].split("error: ", 1)[-1] if rc == 2 and lines else f"exit {rc}"
        if rc != 2:  # a crash, not a user error: show the end of its traceback
            print("\n".join(lines[-15:]), file=sys.stderr)
        raise UserError(
            f"run '{run.key}' of suite '{suite.name}' failed: {why} (log: {log_path}); finished "
            "runs are kept, the same command continues"
        )
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    artefact = build_artefact(
        suite=suite.name,
        invocation=invocation,
        run_id=run.spec.id,
        kind=run.spec.kind,
        repeat=run.repeat,
        overrides=list(run.overrides),
        command=[*(f"{k}={v}" for k, v in run_env(suite, run).items()), Path(cmd[0]).name, *cmd[1:]],
        summary=summary,
        wall_time_s=wall,
        run_dir=run_dir,
        peak=peak,
        flops=flops_report(summary, peak),
    )
    artefact["processes"] = _processes(suite, run)
    folder.mkdir(parents=True, exist_ok=True)  # a run takes minutes: the folder may be gone meanwhile
    if (run_dir / "metrics.jsonl").is_file():
        copy_atomic(run_dir / "metrics.jsonl", metrics_path(folder, run.key))
    write_json_atomic(artefact_path(folder, run.key), artefact)  # last: its presence means "finished"
    fraction = artefact["flops"].get("fraction_of_fp32_peak")
    print(
        f"{wall:.1f} s wall, {artefact['train_time_s']:.1f} s training, "
        f"{artefact['samples_per_s']:.1f} samples/s, "
        + (
            f"{fraction:.1%} of fp32 peak (executed FLOPs)"
            if fraction is not None
            else "fraction of peak unknown"
        ),
        flush=True,
    )
    if work is None:
        shutil.rmtree(scratch, ignore_errors=True)


def _processes(suite: Suite, run: PlannedRun) -> dict:
    """How the run was launched: processes, torch threads each, and whether they oversubscribe the
    suite's threads (more processes than threads: each still gets one)."""
    n = run.spec.processes
    each = threads_per_process(suite.threads, n)
    return {"count": n, "threads_each": each, "oversubscribed": n * each > suite.threads}


def _print_plan(suite: Suite, runs: list[PlannedRun], todo: list[PlannedRun], folder: Path) -> None:
    print(f"suite {suite.name}: {suite.description.strip()}".rstrip(": "))
    print(f"{len(runs)} runs ({len(todo)} to do), {suite.threads} threads; results in {folder}")
    for run in runs:
        state = "to do" if run in todo else "finished"
        env = [f"{k}={v}" for k, v in run_env(suite, run).items()]
        shown = shlex.join([*env, "python", *child_command(run, Path("<scratch>") / run.key)[1:]])
        print(f"  {run.key:<24} {run.spec.kind:<12} {state:<9} {shown}")
