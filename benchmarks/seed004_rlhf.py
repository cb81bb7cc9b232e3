"""Seed 004's RLHF pipeline (benchmarks/suites/seed004-rlhf.yaml): SFT -> merge -> reward model -> DPO and
PPO, each stage a `leantune train` child process (so its peak RSS is its own), then the judge: greedy
responses of the SFT, DPO and PPO models to the held-out prompts (the test split every stage carves from
builtin:rlhf_preferences), scored by the trained reward model; win rate = share of prompts where the
policy's response scores above the SFT model's (ties count half), with a 95% Wilson interval. The reward
model's held-out pair accuracy comes with its binomial standard error and Wilson interval: it says whether
its verdicts are evidence at all.
KL to the SFT model: sampled responses, sum over their tokens of log pi - log pi_SFT (the adapter
disabled is the SFT model). Memory per stage: the memory model (memory/estimate.py, memory/rlhf.py)
beside the measured peak RSS. Writes benchmarks/results/seed004-rlhf/results.json and curves.png.

    python benchmarks/seed004_rlhf.py [--work DIR] [--prompts N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SUITE = Path("benchmarks/suites/seed004-rlhf.yaml")
OUT = Path("benchmarks/results/seed004-rlhf")
NEW_TOKENS = 12
MAX_LEN = 48


def stage_overrides(suite: dict, stage: str, work: Path) -> list[str]:
    run = next(r for r in suite["runs"] if r["id"] == stage)
    return [o.replace("WORKDIR", str(work)) for o in [*suite["common"], *run.get("overrides", [])]]


def run_stage(suite: dict, stage: str, work: Path) -> dict:
    """Run one stage (a finished one in `work` is kept: the same command continues after a stop)."""
    if not (work / stage / "summary.json").is_file():
        _train(suite, stage, work)
    summary = json.loads((work / stage / "summary.json").read_text())
    return {
        "wall_s": summary["wall_time_s"],
        "train_time_s": summary["train"]["train_time_s"],
        "steps": summary["train"]["steps"],
        "peak_rss_bytes": summary["memory"]["peak_rss_bytes"],
        "validation": summary["validation"],
        "test": summary["test"],
        "rlhf": summary.get("rlhf"),
        "trainable": summary["params"]["trainable"],
        "test_pairs": summary["data"]["test"],
        "train_cpu_time_s": summary["train"].get("train_cpu_time_s"),
    }


def _train(suite: dict, stage: str, work: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(suite["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "leantune", "train", *stage_overrides(suite, stage, work)]
    cmd += [f"output.dir={work / stage}", "output.overwrite=true"]
    t0 = time.perf_counter()
    with (work / f"{stage}.log").open("w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=True)
    print(f"{stage}: {time.perf_counter() - t0:.0f} s", flush=True)


def memory_model(suite: dict, stage: str, work: Path) -> dict:
    """The memory model's bytes for the stage's step, at its batch size and longest training example."""
    import torch

    from leantune.config import load_config
    from leantune.memory.estimate import estimate_memory
    from leantune.memory.rlhf import rlhf_memory, rows_per_example, weight_bytes
    from leantune.methods import MethodContext, apply_methods
    from leantune.models.loader import load_model, load_tokenizer
    from leantune.models.reward import method_task
    from leantune.recipes.plan import longest_example
    from leantune.train.features import build_features

    cfg = load_config(None, [*stage_overrides(suite, stage, work), f"output.dir={work / 'unused'}"])
    tok = load_tokenizer(cfg.model.name)
    seq = min(longest_example(cfg.task, build_features(cfg, tok)["train"]), cfg.model.max_length)
    torch.manual_seed(0)
    model = load_model(cfg.model.name, cfg.task, cfg.model.dtype, None, tok.pad_token_id)
    base = weight_bytes(model)
    model = apply_methods(model, cfg.methods, MethodContext(task=method_task(cfg.task), seed=0))
    if cfg.task in ("dpo", "ppo"):
        if cfg.task == "ppo":
            from leantune.train.ppo import attach_value_head

            attach_value_head(model)
        return {"seq_len": seq, **rlhf_memory(model, cfg.task, cfg.train.batch_size, seq, base)}
    rows = cfg.train.batch_size * rows_per_example(cfg.task)  # a reward pair is two rows (as plan)
    est = estimate_memory(model, method_task(cfg.task), rows, seq)
    return {"seq_len": seq, "total": est.total_bytes, "policy_weights": est.weight_bytes}


def wilson(successes: float, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a binomial proportion (ties counted half enter as half successes)."""
    if n == 0:
        return [0.0, 1.0]
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return [centre - half, centre + half]


def held_out_prompts(n: int) -> tuple[list[str], dict]:
    """The first `n` test-split prompts (the split every stage carves), and how many of them any
    training split also holds (the same prompt text in another pair)."""
    from leantune.config import DataConfig
    from leantune.data.tasks import load_raw_splits

    raw = load_raw_splits(DataConfig(source="builtin:rlhf_preferences"))
    prompts = [r["prompt"] for r in raw.test][:n]
    seen = {r["prompt"] for r in raw.train} | {r["prompt"] for r in raw.validation}
    sources = [r["source"] for r in raw.test][:n]
    info = {
        "n": len(prompts),
        "also_in_train_or_validation": sum(p in seen for p in prompts),
        "hhh": sum(s.startswith("hhh") for s in sources),
        "mctaco": sum(s.startswith("mctaco") for s in sources),
    }
    return prompts, info


def reward_accuracy(stage: dict) -> dict:
    """The reward model's held-out (test split) pair accuracy with its binomial spread."""
    acc, n = stage["test"]["accuracy"], stage["test_pairs"]
    return {
        "accuracy": acc,
        "n_pairs": n,
        "std_error": (acc * (1 - acc) / n) ** 0.5,
        "wilson_95": wilson(acc * n, n),
    }


def judge(work: Path, prompts: list[str]) -> dict:
    """Greedy responses scored by the reward model; win rate against SFT; sampled KL to SFT."""
    import torch

    from leantune.models.loader import load_model, load_tokenizer
    from leantune.recipes.common import load_run_config, load_trained_model
    from leantune.recipes.rlhf import load_reward_scorer
    from leantune.settings import PPOConfig
    from leantune.train.ppo import PPORuntime

    sft_dir = str(work / "sft" / "merged")
    tok = load_tokenizer(sft_dir)
    score = load_reward_scorer(work / "reward", tok)
    max_len = MAX_LEN
    features = []
    for p in prompts:
        ids = tok(p)["input_ids"][-(max_len - NEW_TOKENS) :]
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    models = {"sft": load_model(sft_dir, "causal_lm").eval()}
    for stage in ("dpo", "ppo"):
        models[stage] = load_trained_model(work / stage, load_run_config(work / stage)).eval()
    rewards, out = {}, {}
    for name, model in models.items():
        responses = []
        with torch.no_grad():
            for f in features:
                ids = torch.tensor([f["input_ids"]])
                seq = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )[0, ids.shape[1] :].tolist()
                responses.append([t for t in seq if t not in (tok.eos_token_id, tok.pad_token_id)])
        rewards[name] = score([f["input_ids"] + r for f, r in zip(features, responses, strict=True)]).tolist()
        runtime = PPORuntime(
            PPOConfig(max_new_tokens=NEW_TOKENS), score, tok.pad_token_id, tok.eos_token_id, max_len
        )
        sampled = runtime.evaluate(model, features, 8, seed=0) if name != "sft" else {"kl": 0.0}
        out[name] = {
            "mean_reward_greedy": sum(rewards[name]) / len(prompts),
            "kl_to_sft": sampled["kl"],
            "example": tok.decode(responses[0]),
        }
    for name in ("dpo", "ppo"):
        pairs = zip(rewards[name], rewards["sft"], strict=True)
        wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs)
        out[name]["win_rate_vs_sft"] = wins / len(prompts)
        out[name]["win_rate_wilson_95"] = wilson(wins, len(prompts))
        out[name]["ties_with_sft"] = sum(a == b for a, b in zip(rewards[name], rewards["sft"], strict=True))
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ppo = results["stages"]["ppo"]["rlhf"]["history"]
    dpo = results["stages"]["dpo"]["rlhf"]["history"]
    axes[0].plot(
        [h["step"] for h in ppo], [h["score"] for h in ppo], "o-", label="PPO rollout reward (RM score)"
    )
    axes[0].plot(
        [h["step"] for h in dpo], [h["reward_margin"] for h in dpo], "s-", label="DPO held-out margin"
    )
    axes[0].set_xlabel("optimizer step")
    axes[0].set_title("reward")
    axes[0].legend(fontsize=8)
    axes[1].plot(
        [h["step"] for h in ppo], [h["kl"] for h in ppo], "o-", label="PPO rollout KL (nats/response)"
    )
    axes[1].plot([h["step"] for h in dpo], [h["kl"] for h in dpo], "s-", label="DPO held-out KL (nats/token)")
    axes[1].set_xlabel("optimizer step")
    axes[1].set_title("KL to the SFT reference")
    axes[1].legend(fontsize=8)
    fig.suptitle("seed004-rlhf: SmolLM2-135M-Instruct, LoRA, tiny CPU run", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--prompts", type=int, default=48)
    args = parser.parse_args()
    suite = yaml.safe_load(SUITE.read_text())
    work = (args.work or Path(tempfile.mkdtemp(prefix="seed004-rlhf-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    stages = {"sft": run_stage(suite, "sft", work)}
    if not (work / "sft" / "merged").is_dir():
        subprocess.run([sys.executable, "-m", "leantune", "export", str(work / "sft"), "--merge"], check=True)
    for stage in ("reward", "dpo", "ppo"):
        stages[stage] = run_stage(suite, stage, work)
    t_judge = time.perf_counter()  # stage walls come from their summaries (a continued run keeps them)
    for stage in stages:
        stages[stage]["memory_model"] = memory_model(suite, stage, work)
    prompts, prompt_info = held_out_prompts(args.prompts)
    results = {
        "stages": stages,
        "reward_model_held_out": reward_accuracy(stages["reward"]),
        "judge": judge(work, prompts),
        "prompts": prompt_info,
        "total_wall_s": sum(s["wall_s"] for s in stages.values()) + time.perf_counter() - t_judge,
        "load_1min": os.getloadavg()[0],
        "machine": "shared 2-core CPU (other engineers' jobs running)",
    }
    OUT.mkdir(parents=True, exist_ok=True)
    from leantune.atomic import write_json_atomic

    write_json_atomic(OUT / "results.json", results)
    plot(results, OUT / "curves.png")
    print(json.dumps({k: results[k] for k in ("reward_model_held_out", "judge", "prompts")}, indent=1))


if __name__ == "__main__":
    main()
