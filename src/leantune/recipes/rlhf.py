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


def rlhf_report(task: str, runtime, metrics_path: Path) -> dict | None:
    """Reward and KL over training for summary.json: PPO's rollouts, DPO's validation evaluations."""
    if task == "ppo":
        return runtime.report()
    if task != "dpo" or not metrics_path.is_file():
        return None
    keys = ("step", "reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward", "kl")
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return {"history": [{k: r[k] for k in keys} for r in rows if r.get("split") == "validation"]}
