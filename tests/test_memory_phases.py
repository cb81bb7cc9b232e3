"""The memory model's phases beyond one training step: the evaluation pass (a causal LM's logits and
their log-softmax, whole), a tied weight's second gradient, and what dpo/ppo hold beside a fully tuned
policy in plan's full-parameter line. Numbers, on the tiny tied-embedding Llama (models/tiny.py)."""

from __future__ import annotations

import pytest


@pytest.fixture
def tied_llama(tiny_models):
    from leantune.models.loader import load_model

    return load_model(str(tiny_models["llama_tied"]), "causal_lm", "float32", None, 0)


def _rows(n: int, seq: int, vocab: int) -> list[dict]:
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (n, seq), generator=gen).tolist()
    return [{"input_ids": r, "attention_mask": [1] * seq, "labels": list(r)} for r in ids]


def test_eval_forward_is_the_measured_evaluation_pass(tied_llama):
    """The traced evaluation peak is what leantune's own `evaluate` allocates (LiveBytes per storage),
    and it holds the logits twice (their log-softmax in the loss): counting per tensor halved that."""
    from leantune.eval.loop import evaluate
    from leantune.memory.estimate import eval_forward_bytes
    from leantune.memory.live import LiveBytes

    vocab = tied_llama.config.vocab_size
    rows, seq = 16, 32
    with LiveBytes(views=True) as live:
        evaluate(tied_llama, _rows(rows, seq, vocab), "causal_lm", rows, 0)
    predicted = eval_forward_bytes(tied_llama, "causal_lm", seq, rows)
    logits = rows * seq * vocab * 4
    assert predicted >= 2 * logits
    assert abs(predicted - live.peak) / live.peak < 0.15, (predicted, live.peak)
    with LiveBytes() as per_tensor:  # the old count frees the logits when the matmul's own tensor dies
        evaluate(tied_llama, _rows(rows, seq, vocab), "causal_lm", rows, 0)
    assert per_tensor.peak < 1.6 * logits < live.peak


def test_the_evaluation_pass_can_set_the_peak(tied_llama):
    """A LoRA step on 2 short rows is small; evaluating 32 rows of 32 tokens holds 2 x 32 x 32 x 30,522
    floats: the plan names the evaluation as the peak and counts it in the total."""
    from leantune.config import load_config
    from leantune.memory.estimate import estimate_memory
    from leantune.memory.sharding import rank_memory
    from leantune.methods import MethodContext, apply_methods

    cfg = load_config(None, ["task=causal_lm", "methods=[{name: lora, r: 4}]"])
    model = apply_methods(tied_llama, cfg.methods, MethodContext(task="causal_lm", seed=0))
    without = estimate_memory(model, "causal_lm", 2, 8)
    est = estimate_memory(model, "causal_lm", 2, 8, eval_batch=32, eval_seq_len=32)
    assert without.peak_phase == "train" and without.eval_peak_bytes == 0
    assert est.peak_phase == "eval" and est.eval_bytes >= 2 * 32 * 32 * 30522 * 4
    assert est.total_bytes == est.weight_bytes + est.optimizer_bytes + est.eval_bytes > without.total_bytes
    rank = rank_memory(model, est, 1, "none")
    assert rank.peak_at == "eval" and rank.peak_phase == "eval"
    assert rank.training == rank.weights + rank.optimizer_state + est.eval_bytes
    fsdp = rank_memory(model, est, 2, "fsdp")  # the root stays gathered beside the evaluation
    assert (
        fsdp.moments["eval"] == fsdp.weights + fsdp.optimizer_state + fsdp.gathered_weights + est.eval_bytes
    )


def test_a_tied_weight_has_two_gradients_at_the_end_of_backward(tied_llama, tiny_models):
    """Tied input/output embeddings: counted once as weights, twice as gradients at the end of
    backward (the head's, held through backward, and the embedding's, before they are added)."""
    from leantune.memory.estimate import estimate_memory
    from leantune.memory.sharding import rank_memory, tied_trainable_bytes
    from leantune.models.loader import load_model

    embedding = tied_llama.get_input_embeddings().weight
    emb_bytes = embedding.numel() * 4
    assert tied_trainable_bytes(tied_llama) == emb_bytes
    untied = load_model(str(tiny_models["llama"]), "causal_lm", "float32", None, 0)
    assert tied_trainable_bytes(untied) == 0
    est = estimate_memory(tied_llama, "causal_lm", 2, 8)
    assert est.weight_bytes == sum(p.numel() * 4 for p in set(tied_llama.parameters()))  # once
    one, fsdp = rank_memory(tied_llama, est, 1, "none"), rank_memory(tied_llama, est, 2, "fsdp")
    assert one.moments["backward_end"] == one.weights + one.optimizer_state + one.gradients + emb_bytes
    root_grads = fsdp.gathered_root_gradients // 2
    assert fsdp.backward_end_root == fsdp.root_weights + root_grads + emb_bytes
    embedding.requires_grad_(False)
    try:
        assert tied_trainable_bytes(tied_llama) == 0  # a frozen tied weight has no gradient
    finally:
        embedding.requires_grad_(True)


@pytest.mark.parametrize("task", ["dpo", "ppo"])
def test_full_parameter_line_holds_what_dpo_and_ppo_keep_beside_the_policy(tied_llama, task):
    """Full tuning under dpo/ppo: the policy's AdamW step (a DPO pass carries chosen and rejected rows)
    plus a whole frozen copy as the reference, the reference's logits, and for PPO the reward model and
    the value head. A budget that fits the plain causal-LM step no longer fits."""
    from leantune.memory.full_step import step_estimate
    from leantune.recipes.plan import full_parameter_line, full_parameter_options

    batch, seq, vocab = 2, 16, tied_llama.config.vocab_size
    weights = sum(p.numel() * 4 for p in set(tied_llama.parameters()))
    reward = weights  # the reward model: the same architecture
    rows = 2 * batch if task == "dpo" else batch
    policy = step_estimate(tied_llama, "causal_lm", rows, seq)["total"]
    held = weights + rows * seq * vocab * 4 + (reward + 33 * 4 * 4 + 8 if task == "ppo" else 0)
    budget = policy + held // 2  # the policy alone fits, with what is held beside it it does not
    full = full_parameter_options(tied_llama, task, batch, seq, budget, reward)
    assert full["held_beside_policy"]["total"] == held
    assert full["peak_bytes"]["adamw"] == policy + held
    assert not full["adamw_fits"]
    assert all(full["peak_bytes"][n] > held for n in ("adalomo", "lomo", "mezo"))
    line = full_parameter_line(full, budget)
    assert "AdamW needs" in line and "reference copy" in line and ("reward model" in line) == (task == "ppo")
    plain = full_parameter_options(tied_llama, "causal_lm", rows, seq, budget)
    assert plain["adamw_fits"] and "held_beside_policy" not in plain


def test_budget_plan_names_the_evaluation_pass_and_the_eval_batch_that_fits(
    tiny_models, sentiment_csv, tmp_path
):
    """`leantune plan --memory-budget`: a LoRA step on 2 rows fits 40 MiB, but evaluating 32 rows of a
    30,522-token vocabulary does not; the plan says the evaluation sets the peak and which
    eval.batch_size fits (the largest whose forward, scaled by rows, stays within the budget)."""
    import json

    from leantune.cli import main

    out = tmp_path / "plan.json"
    args = [f"model.name={tiny_models['llama_tied']}", f"data.source={sentiment_csv}", "task=causal_lm"]
    args += ["model.max_length=32", "train.num_threads=1", "train.batch_size=2"]
    assert main(["plan", *args, "--memory-budget", "40MiB", "--json", str(out)]) == 0
    plan = json.loads(out.read_text())
    e, est, budget = plan["evaluation"], plan["estimate"], 40 * 2**20
    assert e["batch"] == 32 and e["forward"] >= 2 * 32 * e["seq_len"] * 30522 * 4
    assert e["sets_peak"] and e["peak"] > est["total"] and not e["fits"]
    held, per_row = est["weights"] + est["optimizer_state"], e["forward"] / e["batch"]
    fit = e["fitting_eval_batch_size"]
    assert 0 < fit < 32 and held + fit * per_row <= budget < held + (fit + 1) * per_row


def test_summary_names_the_phase_that_set_the_peak():
    """summary.json's memory.peak_phase: a training step when the largest step peak reaches the process
    peak, else outside the steps (the evaluation, loading or saving); unknown without a step peak."""
    from leantune.memory.measure import peak_phase

    assert (
        peak_phase({"peak_rss_bytes": 100, "step_peak_bytes": 100, "step_peak_source": "rss"}) == "train_step"
    )
    assert (
        peak_phase({"peak_rss_bytes": 150, "step_peak_bytes": 100, "step_peak_source": "rss"})
        == "outside_steps"
    )
    cuda = {"peak_rss_bytes": 10**9, "cuda_max_allocated_bytes": 80, "step_peak_source": "cuda_max_allocated"}
    assert peak_phase({**cuda, "step_peak_bytes": 80}) == "train_step"
    assert peak_phase({"peak_rss_bytes": 100, "step_peak_bytes": None}) is None
