"""PPO from a reward model (task: ppo): Ouyang et al.'s RLHF step with the clipped objective of Schulman
et al. 2017, a value head, GAE, and a per-token KL penalty to the frozen reference whose weight is fixed
or adapts towards a target KL (Ziegler et al. 2019).

Why our own: TRL 1.16.0 ships no PPO trainer any more (its PPOTrainer and the adaptive KL controller
were removed; only GRPO/RLOO-style online trainers remain, and those are transformers.Trainer loops with
pickled checkpoints). So the PPO math is written here, small, and runs as a runtime with its own `step`
inside leantune's loop, which keeps atomic safetensors checkpoints and exact resume: the rollout buffer,
the KL weight and the reward/KL history travel in every checkpoint (`state`/`tensors`), and rollouts
sample with the global torch RNG, which checkpoints restore. TRL's `selective_log_softmax` gives the
per-token log-probabilities (models/dpo.py), as in its online trainers.

One optimizer step uses one rollout batch: with `ppo.ppo_epochs = K`, a rollout is sampled from the
current policy on the step's prompts and then reused for K optimizer steps (the prompts of the K - 1
steps in between are not used), so from the second step on the policy ratio moves off 1 and the clip
binds. Rollouts and the loss are computed without dropout (eval mode), so the ratio at the rollout's own
step is exactly 1. The reference is the model with its adapter disabled, or a frozen copy for full
tuning (models/dpo.py). The value head is a linear layer on the policy's last hidden state (shared
trunk, as TRL's former `AutoModelForCausalLMWithValueHead`): trained and checkpointed with the model,
left out of the saved model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from leantune.errors import UserError
from leantune.methods.base import MethodRuntime
from leantune.models.dpo import REFERENCE, has_adapter, reference_logits
from leantune.settings import PPOConfig

VALUE_HEAD = "v_head"
#: the rollout tensors a checkpoint holds while a rollout still has optimizer steps to give
BUFFER_KEYS = ("seq", "mask", "response_mask", "old_logps", "old_values", "advantages", "returns")

#: scores token sequences (prompt + response, no padding): one reward per sequence
RewardFn = Callable[[list[list[int]]], torch.Tensor]


def _base(model):
    return model.get_base_model() if has_adapter(model) else model


def attach_value_head(model) -> None:
    """A zero-initialised linear value head on the last hidden state; not written by `save_pretrained`."""
    base = _base(model)
    if VALUE_HEAD in base._modules:
        return
    dtype = next(base.parameters()).dtype
    head = torch.nn.Linear(base.config.hidden_size, 1, dtype=dtype)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    base.add_module(VALUE_HEAD, head)
    base._keys_to_ignore_on_save = {*(base._keys_to_ignore_on_save or ()), "v_head.weight", "v_head.bias"}


def attach_reference(model) -> None:
    """A model without an adapter keeps a frozen copy of itself as the KL reference (models/dpo.py)."""
    import copy

    if not has_adapter(model) and REFERENCE not in model.__dict__:
        model.__dict__[REFERENCE] = copy.deepcopy(model).eval().requires_grad_(False)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _logps_values(model, seq, mask, start: int, temperature: float, with_values: bool = True):
    """Per-token log-probs of seq[:, start:] under `model` (and the value before each token)."""
    from leantune.models.dpo import _needs_trl

    out = model(input_ids=seq, attention_mask=mask, position_ids=_positions(mask), output_hidden_states=True)
    logits = out.logits[:, start - 1 : -1].float() / temperature
    logps = _needs_trl()(logits, seq[:, start:])
    if not with_values:
        return logps, None
    head = getattr(_base(model), VALUE_HEAD)
    values = head(out.hidden_states[-1][:, start - 1 : -1]).squeeze(-1).float()
    return logps, values


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def _whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = _masked_mean(x, mask)
    var = _masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def gae(rewards, values, mask, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns over response tokens (mask 0 after the end)."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, advantages + values


def adapted_kl_coef(coef: float, kl: float, target: float, samples: int, horizon: int) -> float:
    """Ziegler et al.'s proportional controller: the KL weight grows when the KL is above target."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * samples / horizon)


class PPORuntime(MethodRuntime):
    """PPO's step, rollout buffer and reward/KL history (module docstring)."""

    lr_auto_refusal = "task ppo samples rollouts and steps its policy and value head its own way"

    def __init__(
        self, cfg: PPOConfig, reward_fn: RewardFn, pad_id: int, eos_id: int, max_length: int
    ) -> None:
        self.cfg, self.reward_fn = cfg, reward_fn
        self.pad_id, self.eos_id, self.max_length = pad_id, eos_id, max_length
        self.kl_coef = cfg.kl_coef
        self.uses_left = 0  # optimizer steps the buffered rollout still gives
        self.prompt_len = 0
        self.buffer: dict[str, torch.Tensor] = {}
        self.history: list[dict] = []  # one row per rollout: step, score, kl, kl_coef
        self._stats: dict[str, float] = {}
        self.step = self._step

    def check_run(self, cfg, world: int) -> None:
        """One process: rollouts are sampled and scored per process, and nothing gathers them."""
        if world > 1:
            raise UserError("task ppo runs on one process; launch it without torchrun")

    # -- rollouts ------------------------------------------------------------------------------------
    def _prompts(self, batch) -> torch.Tensor:
        """Left-padded prompts (their last max_length - max_new_tokens tokens) and their mask."""
        keep = self.max_length - self.cfg.max_new_tokens
        rows = [
            ids[m.bool()][-keep:] for ids, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
        return ids.to(batch["input_ids"].device), mask.to(batch["input_ids"].device)

    @torch.no_grad()
    def sample(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Responses sampled from `model`: the sequences, their mask, the response mask (through the first
        EOS) and the reward model's score of each prompt + response (EOS and padding left out)."""
        ids, mask = self._prompts(batch)
        seq = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=self.cfg.max_new_tokens,
            min_new_tokens=1,
            do_sample=True,
            temperature=self.cfg.temperature,
            top_k=0,
            top_p=1.0,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
        )
        response = seq[:, ids.shape[1] :]
        ended = (response == self.eos_id).long().cumsum(-1)
        response_mask = ((ended == 0) | ((ended == 1) & (response == self.eos_id))).long()
        texts = [
            p[m.bool()].tolist() + r[(rm.bool()) & (r != self.eos_id)].tolist()
            for p, m, r, rm in zip(ids, mask, response, response_mask, strict=True)
        ]
        scores = self.reward_fn(texts).float().to(seq.device)
        return seq, torch.cat([mask, response_mask], -1), response_mask, scores

    @torch.no_grad()
    def _rollout(self, model, batch) -> None:
        cfg = self.cfg
        seq, mask, response_mask, scores = self.sample(model, batch)
        start = seq.shape[1] - response_mask.shape[1]
        logps, values = _logps_values(model, seq, mask, start, cfg.temperature)
        ref = reference_logits(model, seq, mask, _positions(mask))[:, start - 1 : -1].float()
        from leantune.models.dpo import _needs_trl

        ref_logps = _needs_trl()(ref / cfg.temperature, seq[:, start:])
        rm = response_mask.float()
        kl = (logps - ref_logps) * rm
        rewards = -self.kl_coef * kl
        last = (response_mask.sum(-1) - 1).clamp(min=0)
        rewards[torch.arange(len(seq)), last] += scores
        values = values * rm
        advantages, returns = gae(rewards, values, rm, cfg.gamma, cfg.lam)
        self.buffer = {
            "seq": seq,
            "mask": mask,
            "response_mask": rm,
            "old_logps": logps * rm,
            "old_values": values,
            "advantages": _whiten(advantages, rm),
            "returns": returns,
        }
        self.prompt_len, self.uses_left = start, cfg.ppo_epochs
        kl_mean = float(kl.sum(-1).mean())
        self._stats = {"score": float(scores.mean()), "kl": kl_mean, "kl_coef": self.kl_coef}
        if cfg.kl_target is not None:
            self.kl_coef = adapted_kl_coef(self.kl_coef, kl_mean, cfg.kl_target, len(seq), cfg.kl_horizon)

    # -- the step ------------------------------------------------------------------------------------
    def _step(self, model, batch, accelerator, scale: float) -> torch.Tensor:
        cfg = self.cfg
        was_training = model.training
        model.eval()  # no dropout: the ratio is exactly 1 at the rollout's own step
        try:
            if self.uses_left == 0:
                self._rollout(model, batch)
            b = self.buffer
            logps, values = _logps_values(model, b["seq"], b["mask"], self.prompt_len, cfg.temperature)
        finally:
            model.train(was_training)
        rm, adv = b["response_mask"], b["advantages"]
        ratio = torch.exp((logps - b["old_logps"]) * rm)
        clipped = ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range)
        pg_loss = _masked_mean(torch.max(-adv * ratio, -adv * clipped), rm)
        values_clipped = b["old_values"] + (values - b["old_values"]).clamp(
            -cfg.clip_range_value, cfg.clip_range_value
        )
        vf_loss = 0.5 * _masked_mean(
            torch.max((values - b["returns"]) ** 2, (values_clipped - b["returns"]) ** 2), rm
        )
        loss = pg_loss + cfg.vf_coef * vf_loss
        accelerator.backward(loss * scale)
        self.uses_left -= 1
        self._stats |= {
            "pg_loss": float(pg_loss.detach()),
            "vf_loss": float(vf_loss.detach()),
            "clipfrac": float(_masked_mean(((ratio.detach() - 1).abs() > cfg.clip_range).float(), rm)),
        }
        return loss.detach()

    def on_step_end(self, trainer) -> None:
        """The step's rollout numbers go to metrics.jsonl (split `rollout`) and the run's history."""
        row = {"step": trainer.state.step + 1, **self._stats}
        if "score" in self._stats:
            self.history.append({k: row[k] for k in ("step", "score", "kl", "kl_coef")})
        trainer.log.log({**row, "split": "rollout"})
        self._stats = {}

    # -- evaluation ----------------------------------------------------------------------------------
    def evaluate(self, model, features: list[dict], batch_size: int, seed: int) -> dict[str, float]:
        """Mean reward-model score and KL to the reference (summed over response tokens, an unbiased
        estimate of the sequence KL) of responses sampled for `features`' prompts, with a fixed seed and
        without touching the training RNG."""
        from leantune.data.tasks import collate

        if not features:
            return {}
        was_training = model.training
        model.eval()
        scores, kls = [], []
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            device = next(model.parameters()).device
            for at in range(0, len(features), batch_size):
                batch = {
                    k: v.to(device) for k, v in collate(features[at : at + batch_size], self.pad_id).items()
                }
                seq, mask, response_mask, score = self.sample(model, batch)
                start = seq.shape[1] - response_mask.shape[1]
                logps, _ = _logps_values(model, seq, mask, start, self.cfg.temperature, with_values=False)
                ref = reference_logits(model, seq, mask, _positions(mask))[:, start - 1 : -1].float()
                from leantune.models.dpo import _needs_trl

                ref_logps = _needs_trl()(ref / self.cfg.temperature, seq[:, start:])
                scores += score.tolist()
                kls += ((logps - ref_logps) * response_mask).sum(-1).tolist()
        model.train(was_training)
        reward, kl = sum(scores) / len(scores), sum(kls) / len(kls)
        return {"reward": reward, "kl": kl, "objective": reward - self.kl_coef * kl}

    # -- checkpoints and report ----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "kl_coef": self.kl_coef,
            "uses_left": self.uses_left,
            "prompt_len": self.prompt_len,
            "history": self.history,
        }

    def tensors(self) -> dict[str, Any]:
        return {k: v.detach().cpu().contiguous() for k, v in self.buffer.items()} if self.uses_left else {}

    def load(self, state: dict[str, Any], tensors: dict[str, Any]) -> None:
        self.kl_coef, self.uses_left = state["kl_coef"], state["uses_left"]
        self.prompt_len, self.history = state["prompt_len"], list(state["history"])
        self.buffer = dict(tensors) if self.uses_left else {}

    def on_train_start(self, trainer) -> None:
        device = next(trainer.module.parameters()).device
        self.buffer = {k: v.to(device) for k, v in self.buffer.items()}

    def report(self) -> dict[str, Any]:
        h = self.history
        return {
            "rollouts": len(h),
            "kl_coef": self.kl_coef,
            "first_score": h[0]["score"] if h else None,
            "last_score": h[-1]["score"] if h else None,
            "last_kl": h[-1]["kl"] if h else None,
            "history": h,
        }
