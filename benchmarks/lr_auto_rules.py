"""Which rule should `train.lr: auto` read off its range test? Evidence from the time-to-quality workloads.

    python benchmarks/lr_auto_rules.py collect     # 4 workloads x 3 seeds: the range test's curve each
    python benchmarks/lr_auto_rules.py compare     # each rule's rate beside the rates HF's sweep tried
    python benchmarks/lr_auto_rules.py collect-steps   # 50- and 75-step tests, fp32 plain and with levers
    python benchmarks/lr_auto_rules.py compare-steps   # valley at 50, at 75, 50 retried at 75 on no signal

Why: in `time-to-quality` (seed 0) lr auto's rule (rate at the minimum of the EMA-smoothed loss / 3)
chose 1.8-8.5x the rate HF Trainer's 3-rate sweep found best, and LoRA runs at those rates ended near
the majority class. `collect` runs the range test of each workload exactly as the `lt_levers` arm does
(`leantune train ... train.lr=auto`, bf16, grouped batches; `train.max_steps=1` so only the test and
one step run) and keeps the curve from summary.json's `lr_auto`; `compare` applies each candidate rule
to the same curves, so the rules differ only in how they read them. The reference is
time-to-quality-sweep's validation accuracy per rate (seed 0). "min/3" was leantune's rule before;
the valley row calls the shipped rule (leantune.train.lr_find.choose).
Writes benchmarks/results/lr-auto-rules/curves.json and rules.json.

`collect-steps`/`compare-steps` (after time-to-quality-levers, where a 50-step test in fp32 on RT saw a
loss that never left its noise and chose 7e-5): each workload and seed, in fp32 without grouping (the
levers suite's `lr_auto` arm) and with bf16 + grouping (the `lt_levers` arm), at 50 and 75 steps (75 is
one epoch here, the most the test takes); `fall_over_noise` is the shipped measure of signal
(leantune.train.lr_find). Writes curves-steps.json and steps.json.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "lr-auto-rules"
SWEEP = ROOT / "benchmarks" / "results" / "time-to-quality-sweep"
sys.path.insert(0, str(ROOT / "benchmarks"))

from time_to_quality import COMMON_CLS, LEVERS, SPECS  # noqa: E402

from leantune.train.lr_find import MIN_FALL_OVER_NOISE, choose  # noqa: E402


def _common() -> list[str]:
    return [line.strip()[2:] for line in COMMON_CLS.splitlines()[1:]]


def range_test(workload_setting: list[str], seed: int, extra: list[str], run: Path) -> dict:
    """Run one workload's range test as a `lr: auto` run does (then one step) and return its `lr_auto`."""
    argv = [*_common(), *workload_setting, f"train.seed={seed}", "train.lr=auto", *extra]
    argv += ["train.max_steps=1", "train.num_threads=2", f"output.dir={run}"]
    subprocess.run([sys.executable, "-m", "leantune", "train", *argv], check=True, capture_output=True)
    return json.loads((run / "summary.json").read_text(encoding="utf-8"))["lr_auto"]


def collect() -> None:
    workloads = SPECS["time-to-quality"][3]
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (0, 1, 2):
            for w, (setting, _) in workloads.items():
                found = range_test(setting, seed, LEVERS, Path(tmp) / f"{w}_s{seed}")
                curves[f"{w}.s{seed}"] = found
                print(f"{w} seed {seed}: chose {found['lr']:.3g} ({found['steps_run']} steps)")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "curves.json").write_text(json.dumps(curves, indent=1), encoding="utf-8")


def rule_min_over(divisor: float):
    def rule(lrs: list[float], smoothed: list[float]) -> float:
        skip = len(smoothed) // 5
        best = min(range(skip, len(smoothed)), key=lambda i: smoothed[i])
        return lrs[best] / divisor

    return rule


RULES = {  # id: (what it is, the rule)
    "min_over_3": ("minimum smoothed loss / 3 (leantune's rule before)", rule_min_over(3.0)),
    "min_over_10": ("minimum smoothed loss / 10 (fastai v1)", rule_min_over(10.0)),
    "valley": ("valley (fastai v2; leantune's rule now)", lambda lrs, sm: choose(lrs, sm, 0.0, 1.0)),
}


def sweep_reference() -> dict[str, dict[float, float]]:
    """{workload: {rate: final validation accuracy}} of HF's seed-0 sweep."""
    ref: dict[str, dict[float, float]] = {}
    for path in sorted(SWEEP.glob("hf_*-r1.json")):
        a = json.loads(path.read_text(encoding="utf-8"))
        w = "_".join(path.name.split("_")[1:3])
        ref.setdefault(w, {})[a["config"]["train"]["lr"]] = a["metrics"]["validation"]["accuracy"]
    return ref


def compare() -> dict:
    curves = json.loads((OUT / "curves.json").read_text(encoding="utf-8"))
    ref = sweep_reference()
    out: dict = {"reference": {w: {f"{k:g}": v for k, v in r.items()} for w, r in ref.items()}, "rules": {}}
    for name, (label, rule) in RULES.items():
        per_run, errors = {}, []
        for key, found in curves.items():
            w = key.split(".")[0]
            c = found["curve"]
            lr = min(max(rule(c["lr"], c["smoothed_loss"]), found["range"][0]), found["range"][1])
            best = max(ref[w], key=ref[w].get)
            err = math.log10(lr / best)
            per_run[key] = {"lr": lr, "best_swept": best, "log10_over_best": err}
            errors.append(abs(err))
        ratios = [10 ** r["log10_over_best"] for r in per_run.values()]
        out["rules"][name] = {
            "label": label,
            "runs": per_run,
            "min_over_best": min(ratios),
            "max_over_best": max(ratios),
            "median_abs_log10_error": statistics.median(errors),
            "max_abs_log10_error": max(errors),
        }
        print(
            f"{name:20s} median |log10(chosen/best)| {statistics.median(errors):.2f}, max {max(errors):.2f}"
        )
        for key, r in per_run.items():
            times = 10 ** r["log10_over_best"]
            print(f"    {key:18s} {r['lr']:.2e} (best swept {r['best_swept']:g}, x{times:.2f})")
    (OUT / "rules.json").write_text(json.dumps(out, indent=1), encoding="utf-8")
    return out


STEP_SETTINGS = {"plain": [], "levers": LEVERS}
STEPS = (50, 75)


def collect_steps() -> None:
    workloads = SPECS["time-to-quality"][3]
    found_all = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (0, 1, 2):
            for w, (setting, _) in workloads.items():
                for name, levers in STEP_SETTINGS.items():
                    for k in STEPS:
                        key = f"{w}.{name}.k{k}.s{seed}"
                        extra = [*levers, f"train.lr_auto_steps={k}"]
                        found = found_all[key] = range_test(setting, seed, extra, Path(tmp) / key)
                        print(
                            f"{key}: {found['lr']:.3g}, fall/noise {found['fall_over_noise']:.2f}", flush=True
                        )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "curves-steps.json").write_text(json.dumps(found_all, indent=1), encoding="utf-8")


def compare_steps() -> dict:
    """Per setting: valley at 50 steps, at 75, and 50 retried at 75 when the 50-step curve has no signal;
    each against the best rate of HF's sweep, with how often the retry ran and what it cost."""
    found = json.loads((OUT / "curves-steps.json").read_text(encoding="utf-8"))
    ref = sweep_reference()
    out: dict = {"min_fall_over_noise": MIN_FALL_OVER_NOISE, "settings": {}}
    for name in STEP_SETTINGS:
        runs = sorted({(k.split(".")[0], k.split(".")[3]) for k in found if k.split(".")[1] == name})
        rules: dict[str, dict] = {"k50": {}, "k75": {}, "retry": {}}
        extra_s, retried = [], 0
        for w, seed in runs:
            short, long_ = found[f"{w}.{name}.k50.{seed}"], found[f"{w}.{name}.k75.{seed}"]
            pick = short if short["signal"] else long_
            retried += not short["signal"]
            extra_s.append(0.0 if short["signal"] else long_["time_s"])
            best = max(ref[w], key=ref[w].get)
            for rule, chosen in (("k50", short), ("k75", long_), ("retry", pick)):
                rules[rule][f"{w}.{seed}"] = {
                    "lr": chosen["lr"],
                    "over_best": chosen["lr"] / best,
                    "fall_over_noise": chosen["fall_over_noise"],
                }
        summary = {}
        for rule, per in rules.items():
            errors = [abs(math.log10(r["over_best"])) for r in per.values()]
            summary[rule] = {
                "runs": per,
                "min_over_best": min(r["over_best"] for r in per.values()),
                "max_over_best": max(r["over_best"] for r in per.values()),
                "median_abs_log10_error": statistics.median(errors),
                "max_abs_log10_error": max(errors),
                "no_signal": sum(
                    r["fall_over_noise"] is not None and r["fall_over_noise"] < MIN_FALL_OVER_NOISE
                    for r in per.values()
                ),
            }
            print(
                f"{name:7s} {rule:6s} median |log10| {summary[rule]['median_abs_log10_error']:.2f} "
                f"max {summary[rule]['max_abs_log10_error']:.2f} "
                f"x{summary[rule]['min_over_best']:.2f}-x{summary[rule]['max_over_best']:.2f} "
                f"no signal {summary[rule]['no_signal']}/{len(per)}"
            )
        summary["retried"] = retried
        summary["retry_extra_s_mean"] = statistics.fmean(extra_s)
        out["settings"][name] = summary
    (OUT / "steps.json").write_text(json.dumps(out, indent=1), encoding="utf-8")
    return out


if __name__ == "__main__":
    commands = {
        "collect": collect,
        "compare": compare,
        "collect-steps": collect_steps,
        "compare-steps": compare_steps,
    }
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        raise SystemExit(__doc__)
    commands[sys.argv[1]]()
