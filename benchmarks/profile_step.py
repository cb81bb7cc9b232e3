"""Where a training step's time goes: torch.profiler over real steps of leantune's own loop, grouped by op
into categories (matmuls, attention kernel, optimizer, layer norm, softmax, GELU, dropout, embedding, loss,
collation, the trainer's per-step bookkeeping, Python between ops), and interleaved A/B timing of variants.

    # profile the default LoRA job and full fine-tuning (3 warm-up steps, 8 profiled, 8 timed unprofiled)
    PYTHONPATH=src nice -n 5 python benchmarks/profile_step.py profile --threads 2
    -> benchmarks/results/profile/step-lora.json, step-full.json

    # interleaved A/B: each variant gets its own trainer in this process; blocks of --block steps take
    # turns (A, B, A, B, ...) on the same batches, so a shared machine's load hits every variant alike
    PYTHONPATH=src nice -n 5 python benchmarks/profile_step.py ab --name full-adamw \
        --job full --variant foreach=train.adamw_impl=foreach --variant fused=train.adamw_impl=fused

Why a script and not a suite: a suite times whole runs (minutes each, one after the other); the
questions here are per-op shares of one step and small differences between variants, which need the
profiler and same-process interleaving. The step is the trainer's own (`Trainer._run_steps`: collation,
method hooks, the step meter, clipping, the NaN check, optimizer, scheduler, logging), not a hand-made
forward/backward, so per-step work of our own code shows up as it does in a run.

Categories: a profiler event's self time goes to the first category found walking from the event up to
its outermost parent, with the trainer's phases (optimizer step, zero_grad, clipping, collation, ...)
taking precedence over op names (an aten::mul inside AdamW is optimizer time). "python_between_ops" is
the profiled wall time not covered by any top-level event on the training thread: the interpreter
running HF/peft/our module code between kernels, and the profiler's own per-op cost.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch

import leantune.train.loop as loop_mod
from leantune.bench.peak import honest_flops, matmul_peak
from leantune.config import load_config
from leantune.recipes.common import machine, versions
from leantune.recipes.train import prepare

RESULTS = Path("benchmarks/results/profile")

JOBS = {  # the default job (configs/default.yaml) and full fine-tuning (configs/full.yaml)
    "lora": [],
    "full": ["methods=[full]", "train.lr=5e-5"],
}

#: trainer phases, marked by the record_function labels `instrument` adds (or torch's own optimizer labels)
PHASES = [
    ("optimizer", re.compile(r"^Optimizer\.step#")),
    ("zero_grad", re.compile(r"^Optimizer\.zero_grad#")),
    ("clip_grad_norm", re.compile(r"^leantune::clip_grad_norm$")),
    ("collation", re.compile(r"^leantune::collate$")),
    ("step_meter", re.compile(r"^leantune::step_meter$")),
    ("nan_check", re.compile(r"^leantune::finite_step$")),
    ("scheduler", re.compile(r"^leantune::scheduler$")),
    ("logging", re.compile(r"^leantune::log$")),
]

#: op names (forward aten ops and their autograd backward nodes), first match wins, innermost first
OPS = [
    ("matmul", re.compile(r"aten::(addmm|mm|bmm|matmul|linear|baddbmm)$|\b(Addmm|Mm|Bmm|Linear)Backward")),
    ("attention_sdpa", re.compile(r"scaled_dot_product|ScaledDotProduct", re.I)),
    ("softmax", re.compile(r"aten::_?softmax$|\bSoftmaxBackward")),
    ("layer_norm", re.compile(r"layer_norm|LayerNormBackward", re.I)),
    ("gelu", re.compile(r"gelu", re.I)),
    ("dropout", re.compile(r"dropout|bernoulli|DropoutBackward", re.I)),
    ("embedding", re.compile(r"embedding", re.I)),
    ("loss", re.compile(r"cross_entropy|nll_loss|log_softmax|NllLoss|LogSoftmax", re.I)),
    ("grad_accumulate", re.compile(r"AccumulateGrad")),
    ("to_device_copy", re.compile(r"^aten::(to|_to_copy)$")),
]


CATEGORIES = [c for c, _ in PHASES] + [c for c, _ in OPS] + ["other_ops", "python_between_ops"]
TRAINER_OWN = ["collation", "step_meter", "nan_check", "scheduler", "logging", "zero_grad", "to_device_copy"]


def instrument(trainer) -> None:
    """Label the trainer's phases for the profiler (cheap: one record_function per call)."""

    def labelled(fn, label: str):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with torch.profiler.record_function(label):
                return fn(*args, **kwargs)

        return wrapper

    loop_mod.collate = labelled(loop_mod.collate, "leantune::collate")
    trainer.step_meter.start = labelled(trainer.step_meter.start, "leantune::step_meter")
    trainer.step_meter.stop = labelled(trainer.step_meter.stop, "leantune::step_meter")
    trainer._finite_step = labelled(trainer._finite_step, "leantune::finite_step")
    trainer.scheduler.step = labelled(trainer.scheduler.step, "leantune::scheduler")
    trainer.log.log = labelled(trainer.log.log, "leantune::log")
    trainer.acc.clip_grad_norm_ = labelled(trainer.acc.clip_grad_norm_, "leantune::clip_grad_norm")


def _chain(event) -> list[str]:
    """The event's name and its parents', innermost first."""
    chain = []
    node = event
    while node is not None:
        chain.append(node.name)
        node = node.cpu_parent
    return chain


def categorise(event) -> str:
    chain = _chain(event)
    for name in reversed(chain):  # outermost phase wins
        for cat, rx in PHASES:
            if rx.search(name):
                return cat
    for name in chain:  # innermost op name wins
        for cat, rx in OPS:
            if rx.search(name):
                return cat
    return "other_ops"


def breakdown(prof, wall_s: float, steps: int) -> dict:
    """Per-category ms per step and share of the profiled wall time."""
    events = [e for e in prof.events() if e.device_type.name == "CPU"]
    threads = {}
    for e in events:
        threads[e.thread] = threads.get(e.thread, 0.0) + (e.cpu_time_total if e.cpu_parent is None else 0.0)
    main = max(threads, key=threads.get)  # the training thread: the most top-level time
    ms: dict[str, float] = {}
    other: dict[str, float] = {}  # what "other_ops" holds: op <- its parents, so it can be attacked too
    for e in events:
        if e.thread != main:
            continue
        cat = categorise(e)
        ms[cat] = ms.get(cat, 0.0) + e.self_cpu_time_total / 1000.0
        if cat == "other_ops":
            key = " <- ".join(_chain(e)[:3])
            other[key] = other.get(key, 0.0) + e.self_cpu_time_total / 1000.0
    covered = sum(ms.values())
    ms["python_between_ops"] = max(wall_s * 1000.0 - covered, 0.0)
    total = wall_s * 1000.0
    for cat in CATEGORIES:  # every category present, so docs can quote any of them
        ms.setdefault(cat, 0.0)
    per_step = {k: v / steps for k, v in sorted(ms.items(), key=lambda kv: -kv[1])}
    share = {k: v * steps / total for k, v in per_step.items()}
    return {
        "ms_per_step": per_step,
        "share": share,
        # leantune's own per-step work around the model: collation, the step meter, the NaN check, the
        # scheduler, logging, zero_grad and the batch's move to the device
        "share_trainer_own": sum(share[c] for c in TRAINER_OWN),
        "other_ops_top_ms_per_step": {
            k: v / steps for k, v in sorted(other.items(), key=lambda kv: -kv[1])[:15]
        },
        "other_threads_top_level_ms": {str(t): v / 1000.0 for t, v in threads.items() if t != main},
    }


def _largest(values: dict[str, float], n: int) -> list[tuple[str, float]]:
    return sorted(values.items(), key=lambda kv: -kv[1])[:n]


def top_ops(prof, n: int = 25) -> list[dict]:
    table = prof.key_averages()
    rows = sorted(table, key=lambda r: -r.self_cpu_time_total)[:n]
    return [{"op": r.key, "calls": r.count, "self_ms": r.self_cpu_time_total / 1000.0} for r in rows]


def build(job: str, threads: int, extra: list[str], tag: str):
    overrides = [
        *JOBS[job],
        f"train.num_threads={threads}",
        "train.save_every=null",
        "output.tensorboard=false",
        "output.report_to=[none]",
        f"output.dir=/tmp/leantune-profile-{os.getpid()}-{tag}",
        "output.overwrite=true",
        *[e for e in extra if not e.startswith("attn=")],
    ]
    cfg = load_config(None, overrides)
    prep = prepare(cfg)
    for e in extra:  # attn=eager|sdpa: the HF attention implementation, switched after loading
        if e.startswith("attn="):
            hf = next(m for m in prep.model.modules() if hasattr(m, "set_attn_implementation"))
            hf.set_attn_implementation(e.split("=", 1)[1])
    trainer = prep.trainer()
    trainer.model.train()
    for rt in trainer.runtimes:
        rt.on_train_start(trainer)
    trainer.total_steps = 10**9  # we drive the steps (_StopAfter); no end-of-run logging or evaluation
    trainer.steps_per_epoch = 10**9
    trainer.runtimes.append(_StopAfter())
    prep.out.mkdir(parents=True, exist_ok=True)  # the run folder a real run has (metrics.jsonl goes there)
    return prep, trainer


class _StopAfter:
    """A runtime hook that ends the trainer's loop after step `until` (as early stopping would)."""

    step = None
    until = 0

    def on_step_start(self, trainer) -> None: ...

    def on_step_end(self, trainer) -> None:
        trainer.state.stopped_early = trainer.state.step + 1 >= self.until


def run_steps(trainer, n: int) -> float:
    """Run `n` more real optimizer steps through the trainer's loop; return wall seconds."""
    trainer.runtimes[-1].until = trainer.state.step + n
    trainer.state.stopped_early = False
    t0 = time.perf_counter()
    trainer._run_steps(_NoBar())
    return time.perf_counter() - t0


class _NoBar:
    def update(self, n: int) -> None: ...

    def set_postfix(self, **kwargs) -> None: ...


def step_flops(prep, trainer, first: int, n: int) -> float:
    """Executed model FLOPs (leantune.bench.peak's count) of steps first..first+n of epoch 0."""
    batches = trainer._epoch_batches(0)[first : first + n]
    tokens = sum(trainer.lengths[i] for b in batches for i in b)
    profile = prep.params["flop_profile"]
    return honest_flops(profile, tokens, {"train": {"steps": n}}, profile["matmul_trainable"])[
        "executed_flops"
    ]


def load_now() -> float:
    return round(os.getloadavg()[0], 2)


def profile_job(job: str, args, peak: dict) -> dict:
    prep, trainer = build(job, args.threads, args.set, job)
    instrument(trainer)
    run_steps(trainer, args.warmup)
    first = trainer.state.step
    loads = [load_now()]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        wall = run_steps(trainer, args.steps)
    loads.append(load_now())
    # the same number of steps again without the profiler: its overhead, and an unprofiled step time
    trainer.state.step = first  # replay the same batches
    trainer.state.group = first
    plain = run_steps(trainer, args.steps)
    loads.append(load_now())
    flops = step_flops(prep, trainer, first, args.steps)
    out = {
        "what": f"one training step of the {job} job, categories of torch.profiler CPU self time",
        "command": f"benchmarks/profile_step.py profile --jobs {job} --threads {args.threads} "
        f"--warmup {args.warmup} --steps {args.steps}"
        + "".join(f" --set {s}" for s in args.set)
        + (f" --suffix={args.suffix}" if args.suffix else ""),
        "job": job,
        "config": prep.cfg.model_dump(mode="json"),
        "steps_profiled": args.steps,
        "warmup_steps": args.warmup,
        "profiled_step_ms": wall * 1000.0 / args.steps,
        "unprofiled_step_ms": plain * 1000.0 / args.steps,
        "profiler_overhead": wall / plain - 1.0,
        **breakdown(prof, wall, args.steps),
        "top_ops": top_ops(prof),
        "flops": {
            "executed_per_step": flops / args.steps,
            "achieved_gflops_unprofiled": flops / plain / 1e9,
            "fp32_peak_gflops": peak["fp32_gflops"],
            "fraction_of_fp32_peak": flops / plain / 1e9 / peak["fp32_gflops"],
        },
        "load_avg_1m": loads,
        "versions": versions(),
        "machine": machine(),
        "shared_machine": "~6 engineers on 2 cores: timings are noisy, shares more stable than ms",
    }
    matmul = out["share"].get("matmul", 0.0)
    out["share_matmul_and_sdpa"] = matmul + out["share"].get("attention_sdpa", 0.0)
    return out


def cmd_profile(args) -> None:
    torch.set_num_threads(args.threads)
    peak = matmul_peak(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for job in args.jobs:
        out = profile_job(job, args, peak)
        path = RESULTS / f"step-{job}{args.suffix}.json"
        path.write_text(json.dumps(out, indent=2) + "\n")
        shares = ", ".join(f"{k} {v:.1%}" for k, v in out["share"].items() if v >= 0.005)
        print(f"{job}: {out['unprofiled_step_ms']:.0f} ms/step unprofiled; {shares} -> {path}")


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition("=")
    return name, [s for s in rest.split(",") if s]


def split_variant(tokens: list[str], threads: int) -> tuple[dict[str, str], int, list[str]]:
    """A variant's environment (`env:KEY=VALUE`), torch threads (`threads=N`) and config overrides."""
    env = {t[4:].partition("=")[0]: t[4:].partition("=")[2] for t in tokens if t.startswith("env:")}
    for t in tokens:
        if t.startswith("threads="):
            threads = int(t.split("=", 1)[1])
    rest = [t for t in tokens if not t.startswith(("env:", "threads="))]
    return env, threads, rest


def cmd_worker(args) -> None:
    """One variant's trainer, kept in its own process (its environment and allocator are its own): reads
    `first N` lines, replays steps first..first+N, answers one JSON line with the wall ms per step."""
    import sys

    torch.set_num_threads(args.threads)
    prep, trainer = build(args.job, args.threads, args.set, f"w{os.getpid()}")
    run_steps(trainer, args.warmup)
    first = trainer.state.step
    print(json.dumps({"ready": True, "first": first, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        _, n = line.split()
        n = int(n)
        trainer.state.step = trainer.state.group = first  # the same batches every block
        ms = run_steps(trainer, n) * 1000.0 / n
        print(json.dumps({"ms": ms, "flops": step_flops(prep, trainer, first, n) / n}), flush=True)


def cmd_ab(args) -> None:
    """Interleaved blocks: every variant (its own worker process) runs the same steps, in turn (ABBA)."""
    import subprocess
    import sys

    torch.set_num_threads(args.threads)
    peak = matmul_peak(args.threads)
    variants = [parse_variant(v) for v in args.variant]
    workers = {}
    for name, tokens in variants:  # built one after another: loading never overlaps a timed block
        env, threads, rest = split_variant(tokens, args.threads)
        cmd = [sys.executable, __file__, "worker", "--job", args.job, "--threads", str(threads)]
        cmd += ["--warmup", str(args.warmup), *[f"--set={r}" for r in rest]]
        child_env = {**os.environ, "OMP_NUM_THREADS": str(threads), **env}
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env)
        ready = _answer(proc)
        workers[name] = (proc, env, threads, ready)
    times: dict[str, list[float]] = {name: [] for name in workers}
    flops = 0.0
    loads = [load_now()]
    for r in range(args.repeats):
        order = list(workers) if r % 2 == 0 else list(reversed(workers))  # ABBA: none always goes first
        for name in order:
            proc = workers[name][0]
            proc.stdin.write(f"first {args.block}\n")
            proc.stdin.flush()
            reply = _answer(proc)
            times[name].append(reply["ms"])
            flops = reply["flops"]
        loads.append(load_now())
    for proc, *_ in workers.values():
        proc.stdin.close()
        proc.wait()
    base = variants[0][0]
    summary = {}
    for name, (_, env, _threads, ready) in workers.items():
        ratios = [b / t for b, t in zip(times[base], times[name], strict=True)]  # speed-up over the base
        med = statistics.median(times[name])
        summary[name] = {
            "env": env,
            "torch_threads": ready["threads"],
            "step_ms": times[name],
            "median_step_ms": med,
            "min_step_ms": min(times[name]),
            "max_step_ms": max(times[name]),
            "speedup_per_repeat": ratios,
            "speedup_median": statistics.median(ratios),
            "speedup_min": min(ratios),
            "speedup_max": max(ratios),
            "fraction_of_fp32_peak": flops / (med / 1000.0) / 1e9 / peak["fp32_gflops"],
        }
    out = {
        "what": f"interleaved A/B of the {args.job} job's step time: {args.repeats} repeats of {args.block} "
        f"steps per variant, speed-ups over `{base}` per repeat",
        "command": "benchmarks/profile_step.py ab "
        + " ".join(
            [f"--name {args.name} --job {args.job} --threads {args.threads} --repeats {args.repeats}"]
            + [f"--block {args.block} --warmup {args.warmup}"]
            + [f"--variant {v}" for v in args.variant]
        ),
        "job": args.job,
        "base": base,
        "variants": dict(variants),
        "results": summary,
        "flops": {
            "executed_per_step": flops,
            "fp32_peak_gflops": peak["fp32_gflops"],
            "peak_threads": args.threads,
        },
        "load_avg_1m": loads,
        "versions": versions(),
        "machine": machine(),
        "shared_machine": "~6 engineers on 2 cores: variants interleaved so load changes hit all alike",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"ab-{args.name}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    for name, s in summary.items():
        print(
            f"{name}: median {s['median_step_ms']:.0f} ms/step "
            f"({s['min_step_ms']:.0f}-{s['max_step_ms']:.0f}),"
            f" x{s['speedup_median']:.3f} ({s['speedup_min']:.3f}-{s['speedup_max']:.3f}) vs {base}, "
            f"{s['fraction_of_fp32_peak']:.1%} of fp32 peak"
        )
    print(f"-> {path}")


def _answer(proc) -> dict:
    """The worker's next JSON line (anything else it prints, e.g. the run banner, is skipped)."""
    for line in proc.stdout:
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"worker exited with {proc.wait()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("profile")
    p.add_argument("--jobs", nargs="+", default=list(JOBS), choices=list(JOBS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--set", action="append", default=[], help="a config override for every job")
    p.add_argument("--suffix", default="", help="appended to the artefact's name")
    a = sub.add_parser("ab")
    a.add_argument("--name", required=True)
    a.add_argument("--job", default="lora", choices=list(JOBS))
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--warmup", type=int, default=2)
    a.add_argument("--block", type=int, default=4)
    a.add_argument("--repeats", type=int, default=6)
    a.add_argument(
        "--variant",
        action="append",
        required=True,
        help="NAME=TOKEN,TOKEN (the first is the base): config overrides, attn=eager|sdpa, threads=N, "
        "env:KEY=VALUE",
    )
    w = sub.add_parser("worker")
    w.add_argument("--job", default="lora", choices=list(JOBS))
    w.add_argument("--threads", type=int, default=2)
    w.add_argument("--warmup", type=int, default=2)
    w.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    commands = {"profile": cmd_profile, "ab": cmd_ab, "worker": cmd_worker}
    with contextlib.suppress(KeyboardInterrupt):
        commands[args.cmd](args)


if __name__ == "__main__":
    main()
