"""The memory of a DPO or PPO step: what the policy's step costs (the ordinary memory model, on the rows
one forward pass carries) plus what these tasks hold beside it.

- DPO runs chosen and rejected rows in one pass: twice the batch's rows. PPO's policy carries a value
  head (attached before the estimate, so its parameters, gradients and AdamW state are counted).
- The reference: none with an adapter (disabling it gives the base back), a whole frozen copy of the
  weights for full tuning (models/dpo.py).
- The reference's logits for those rows stay alive while the policy's forward and loss run:
  rows x sequence x vocabulary float32 values.
- PPO scores rollouts with a reward model held in memory for the whole run: its weights.

`full_parameter_held` is what a *full* fine-tuning of the policy holds beside it (plan's full-parameter
line): there is no adapter to disable, so the reference is always a whole copy of the weights.
"""

from __future__ import annotations

from leantune.memory.estimate import estimate_memory
from leantune.models.dpo import has_adapter


def rows_per_example(task: str) -> int:
    """Rows one example puts through the model in a pass: a preference pair (dpo, reward) is two, its
    chosen and its rejected sequence, padded to one width."""
    return 2 if task in ("dpo", "reward") else 1


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def rlhf_memory(
    model, task: str, batch_size: int, seq_len: int, reward_weight_bytes: int = 0
) -> dict[str, int]:
    """Bytes of one dpo/ppo training step for `model` as it will be trained (methods applied; a PPO
    policy with its value head); `reward_weight_bytes` is the PPO reward model's weights."""
    rows = batch_size * rows_per_example(task)
    policy = estimate_memory(model, "causal_lm", rows, seq_len)
    reference = 0 if has_adapter(model) else policy.weight_bytes
    vocab = model.get_output_embeddings().weight.shape[0]
    logits = rows * seq_len * vocab * 4
    reward = reward_weight_bytes if task == "ppo" else 0
    return {
        "policy": policy.total_bytes,
        "policy_weights": policy.weight_bytes,
        "policy_step": policy.step_bytes,
        "reference_weights": reference,
        "reference_logits": logits,
        "reward_model_weights": reward,
        "total": policy.total_bytes + reference + logits + reward,
    }


def full_parameter_held(
    model, task: str, batch_size: int, seq_len: int, reward_weight_bytes: int = 0
) -> dict[str, int]:
    """What a dpo/ppo run that tunes every weight of `model` (the base, no adapter) holds beside the
    policy's own step: a frozen whole copy as the reference, the reference's logits for the step's rows,
    PPO's reward model and the value head's weight, gradient and AdamW state (a hidden-to-1 linear)."""
    rows = batch_size * rows_per_example(task)
    vocab = model.get_output_embeddings().weight.shape[0]
    value_head = 0
    if task == "ppo":
        hidden = model.config.hidden_size
        element = next(model.parameters()).element_size()
        value_head = (hidden + 1) * element * 4 + 2 * 4  # weight, gradient, two moments; two step counters
    held = {
        "reference_weights": weight_bytes(model),
        "reference_logits": rows * seq_len * vocab * 4,
        "reward_model_weights": reward_weight_bytes if task == "ppo" else 0,
        "value_head": value_head,
    }
    return {**held, "total": sum(held.values())}
