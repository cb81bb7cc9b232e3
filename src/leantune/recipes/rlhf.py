"""The recipe side of tasks dpo and ppo: the reward model a PPO run is scored by (a finished `task:
reward` run, checked before anything is written), the PPO runtime, the reward/KL curve summary.json
keeps, and the win rate of one run's responses over another's under a reward model (the seed004-rlhf
suite's judge)."""

from __future__ import annotations

import json
from pathlib import Path

from leantune.config import Config
from leantune.errors import UserError

SCORE_BATCH = 8


def load_reward_scorer(run_dir: str | Path, tok):
    """A callable scoring token sequences with the reward model of the finished run `run_dir`.

    Refused in one line: a missing folder, a folder that is no run or an unfinished one, a run of
    another task, or one whose tokenizer differs from the policy's (its scores would read other tokens).
    """
    import torch

    from leantune.models.loader import load_tokenizer
    from leantune.recipes.common import load_run_config, load_trained_model

    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise UserError(f"ppo.reward_run {run} does not exist; point it at a finished `task: reward` run")
    cfg = load_run_config(run)
    if cfg.task != "reward":
        raise UserError(f"ppo.reward_run {run} is a {cfg.task} run; point it at a `task: reward` run")
    if not (run / "summary.json").is_file():
        raise UserError(f"ppo.reward_run {run} did not finish (no summary.json); finish it with --resume")
    if load_tokenizer(str(run / "model")).get_vocab() != tok.get_vocab():
        raise UserError(
            f"ppo.reward_run {run} uses another tokenizer than model.name; train the reward model on the "
            "same base model family"
        )
    model = load_trained_model(run, cfg).eval().requires_grad_(False)
    pad = tok.pad_token_id

    @torch.no_grad()
    def score(sequences: list[list[int]]) -> torch.Tensor:
        device = next(model.parameters()).device
        out = []
        for at in range(0, len(sequences), SCORE_BATCH):
            rows = [s[-cfg.model.max_length :] or [pad] for s in sequences[at : at + SCORE_BATCH]]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
            out.append(model(input_ids=ids, attention_mask=mask).logits[:, 0].float())
        return torch.cat(out)

    return score


def ppo_runtime(cfg: Config, tok, model):
    """The PPO runtime for a prepared policy: value head and (full tuning) reference copy attached."""
    from leantune.train.ppo import PPORuntime, attach_reference, attach_value_head

    assert cfg.ppo.reward_run is not None  # the config refuses task ppo without one
    scorer = load_reward_scorer(cfg.ppo.reward_run, tok)
    attach_reference(model)  # before the value head: the reference needs none
    attach_value_head(model)
    return PPORuntime(cfg.ppo, scorer, tok.pad_token_id, tok.eos_token_id, cfg.model.max_length)


def ppo_eval(run_dir: Path, cfg: Config, tok, model, features: list[dict]) -> dict[str, float]:
    """The held-out numbers a PPO run's training reported for its test split (train/ppo.py's
    `PPORuntime.evaluate`): mean reward-model score, KL to the reference and the objective, of responses
    sampled for `features`' prompts from `model`.

    The scorer is the run's own `ppo.reward_run`; the reference is the adapter disabled, or for full
    tuning the base model reloaded (what training copied before its first step). Sampling is seeded with
    `train.seed` inside a forked RNG, as training's evaluation is, so the numbers repeat the run's own.
    The objective's KL weight is the one the run ended with (summary.json's `rlhf.kl_coef`: an adaptive
    weight moves during training), or `ppo.kl_coef` when the run recorded none."""
    from leantune.models.dpo import REFERENCE, has_adapter
    from leantune.train.ppo import PPORuntime

    scorer = load_reward_scorer(check_reward_run_exists(run_dir, cfg), tok)
    if not has_adapter(model):
        from leantune.recipes.common import load_base

        model.__dict__[REFERENCE] = load_base(cfg).eval().requires_grad_(False)
    runtime = PPORuntime(cfg.ppo, scorer, tok.pad_token_id, tok.eos_token_id, cfg.model.max_length)
    runtime.kl_coef = _final_kl_coef(run_dir, cfg)
    return runtime.evaluate(model, features, cfg.eval.batch_size, cfg.train.seed)


def check_reward_run_exists(run_dir: Path, cfg: Config) -> Path:
    """The reward run a finished PPO run names, refused in one line (before any model loads) when it
    was moved or deleted since training."""
    assert cfg.ppo.reward_run is not None  # the config refuses task ppo without one
    reward_run = Path(cfg.ppo.reward_run).expanduser()
    if not reward_run.is_dir():
        raise UserError(
            f"{run_dir} is scored by its reward model ppo.reward_run {reward_run}, which does not exist "
            f"(moved or deleted?); put it back or point ppo.reward_run in {run_dir / 'config.yaml'} at it"
        )
    return reward_run


def _final_kl_coef(run_dir: Path, cfg: Config) -> float:
    path = run_dir / "summary.json"
    if path.is_file():
        recorded = (json.loads(path.read_text()).get("rlhf") or {}).get("kl_coef")
        if recorded is not None:
            return float(recorded)
    return cfg.ppo.kl_coef


def rlhf_report(task: str, runtime, metrics_path: Path) -> dict | None:
    """Reward and KL over training for summary.json: PPO's rollouts, DPO's validation evaluations."""
    if task == "ppo":
        return runtime.report()
    if task != "dpo" or not metrics_path.is_file():
        return None
    keys = ("step", "reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward", "kl")
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return {"history": [{k: r[k] for k in keys} for r in rows if r.get("split") == "validation"]}
