"""`leantune plan`: the per-layer rank plan for a memory budget, printed without training.

It runs exactly what `dynamic_rank` runs when training starts (its public `score_layers`,
`complexity_of` and `plan_ranks_for`: probe importance, task complexity, the planner under the memory
model), on the config's data and model, and writes nothing unless `--json` is given. With
`--allow-quantize` the saving of a 4-bit base is what the `quant` method's `plan_for` hook says.
Configs without a `dynamic_rank` method are planned with its defaults over the LoRA method's
targets, so `leantune plan configs/default.yaml --memory-budget 1GiB` works too.

Tasks dpo and ppo plan the policy's ranks within the budget left after what those tasks hold beside the
policy (memory/rlhf.py): the frozen reference (none with an adapter), the reference's logits, and for
PPO the reward model (taken as the same architecture as the policy) and the policy's value head; a DPO
step carries chosen and rejected rows, twice the batch.
"""

from __future__ import annotations

from pathlib import Path

from leantune.config import Config
from leantune.errors import UserError
from leantune.models.reward import method_task
from leantune.outputs import check_new_file


def _method_config(cfg: Config, budget: str | None):
    from leantune.memory.budget import check_budget
    from leantune.methods.dynamic_rank import DynamicRankConfig

    if budget is not None:
        try:
            check_budget(budget)
        except ValueError as exc:
            raise UserError(f"--memory-budget: {exc}") from None
    for i, method in enumerate(cfg.methods):
        if method.name == "dynamic_rank":
            if budget is not None:
                method = method.model_copy(update={"budget": budget})
            return i, method
    lora = next((m for m in cfg.methods if m.name == "lora"), None)
    targets = getattr(lora, "target_modules", None)
    if budget is None:
        raise UserError("no dynamic_rank method in the config; pass --memory-budget (e.g. 2GiB or 0.5)")
    method = DynamicRankConfig(budget=budget, target_modules=targets)
    others = [j for j, m in enumerate(cfg.methods) if m.name != "lora"]
    return (others[-1] + 1 if others else 0), method


def make_plan(
    cfg: Config,
    budget: str | None,
    allow_recompute: bool = False,
    allow_batch_reduce: bool = False,
    allow_quantize: bool = False,
) -> dict:
    from leantune.data.arrow_features import example_lengths
    from leantune.memory.budget import parse_budget
    from leantune.methods import MethodContext, apply_methods, get_method
    from leantune.methods.dynamic_rank import complexity_of, plan_ranks_for, score_layers
    from leantune.models.loader import load_model, load_tokenizer
    from leantune.recipes.common import setup_torch
    from leantune.recipes.train import build_features

    index, method = _method_config(cfg, budget)
    budget_bytes = parse_budget(method.budget)  # a fraction means of what is available before loading
    setup_torch(cfg.train.seed, cfg.train.num_threads)
    tok = load_tokenizer(cfg.model.name)
    data = build_features(cfg, tok)
    if not data["train"]:
        raise UserError(f"the training split of {cfg.data.source} is empty; the planner needs probe batches")
    model = load_model(cfg.model.name, cfg.task, cfg.model.dtype, cfg.data.label_names, tok.pad_token_id)
    methods = [m for m in cfg.methods if m.name not in ("lora", "dynamic_rank")]
    methods.insert(min(index, len(methods)), method)
    task = method_task(cfg.task)  # a DPO/PPO policy is planned as the causal LM it is
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # PPO's reward model
    model = apply_methods(model, methods, MethodContext(task=task, seed=cfg.train.seed))
    train = _probe_rows(cfg.task, data["train"])
    importance, probe_loss = score_layers(model, method, train, cfg.train.batch_size, tok.pad_token_id)
    complexity = complexity_of(data["train"], len(cfg.data.label_names or []), probe_loss)
    seq_len = min(max(example_lengths(data["train"])), cfg.model.max_length)
    held = _rlhf_held(cfg, model, seq_len, base_bytes)
    quant = get_method("quant")
    plan = plan_ranks_for(
        model,
        method,
        importance,
        complexity,
        task=task,
        seq_len=seq_len,
        batch_size=cfg.train.batch_size * (2 if cfg.task == "dpo" else 1),
        budget=budget_bytes - (held["total"] if held else 0),
        allow_recompute=allow_recompute,
        allow_batch_reduce=allow_batch_reduce,
        allow_quantize=allow_quantize,
        quantize_with=quant.plan_for(model, quant.config_cls(bits=4)) if allow_quantize else None,
    )
    out = {**plan.to_dict(), "seq_len": seq_len, "task_complexity": complexity, "budget": str(method.budget)}
    return {**out, "rlhf": held} if held else out


def _probe_rows(task: str, train):
    """Causal-LM rows the importance probe can run: a DPO pair's chosen side, a PPO prompt as text."""
    if task == "dpo":
        return [{k: v for k, v in row.items() if not k.startswith("rejected_")} for row in train]
    if task == "ppo":
        return [{**row, "labels": list(row["input_ids"])} for row in train]
    return train


def _rlhf_held(cfg: Config, model, seq_len: int, base_bytes: int) -> dict | None:
    """What a dpo/ppo run holds beside the policy's step (memory/rlhf.py), for the budget."""
    if cfg.task not in ("dpo", "ppo"):
        return None
    from leantune.memory.rlhf import rlhf_memory

    if cfg.task == "ppo":
        from leantune.train.ppo import attach_value_head

        attach_value_head(model)
    mem = rlhf_memory(model, cfg.task, cfg.train.batch_size, seq_len, base_bytes)
    held = {k: mem[k] for k in ("reference_weights", "reference_logits", "reward_model_weights")}
    return {**held, "total": sum(held.values())}


def format_plan(plan: dict) -> str:
    from leantune.memory.planner import fmt_bytes

    c, est = plan["task_complexity"], plan["estimate"]
    lines = [
        f"memory budget {plan['budget']} = {fmt_bytes(plan['budget_bytes'])}"
        + (f", planned within {1 - m:.2f} x budget" if (m := plan.get("safety_margin")) else "")
        + f"; estimate "
        f"{fmt_bytes(est['total'])} (weights {fmt_bytes(est['weights'])}, gradients "
        f"{fmt_bytes(est['gradients'])}, optimizer {fmt_bytes(est['optimizer_state'])}, activations "
        f"{fmt_bytes(est['activations'])}, transient {fmt_bytes(est['transient'])})",
        f"batch {plan['batch_size']} x {plan['seq_len']} tokens (longest training example), recomputation "
        f"{'on' if plan['recompute'] else 'off'}; task complexity {c['complexity']:.2f} (label entropy "
        f"{c['label_entropy']:.2f}, probe loss {c['probe_loss']:.3f} = {c['loss_vs_chance']:.2f} of chance)"
        f" -> rank cap {plan['max_rank']}",
        "changed to fit: " + ("; ".join(plan["changes"]) if plan["changes"] else "nothing"),
        *([_rlhf_line(plan["rlhf"])] if plan.get("rlhf") else []),
        "",
    ]
    width = max(len(layer["name"]) for layer in plan["layers"])
    lines.append(f"{'layer':<{width}}  importance  rank  {'bytes':>10}  reason")
    for layer in plan["layers"]:
        lines.append(
            f"{layer['name']:<{width}}  {layer['importance']:10.4f}  {layer['rank']:4d}  "
            f"{fmt_bytes(layer['bytes']):>10}  {layer['reason']}"
        )
    return "\n".join(lines)


def _rlhf_line(held: dict) -> str:
    from leantune.memory.planner import fmt_bytes

    return (
        f"held beside the policy (outside the estimate above, taken from the budget): reference "
        f"{fmt_bytes(held['reference_weights'])}, reference logits {fmt_bytes(held['reference_logits'])}, "
        f"reward model {fmt_bytes(held['reward_model_weights'])}"
    )


def run_plan(
    cfg: Config,
    budget: str | None,
    allow_recompute: bool = False,
    allow_batch_reduce: bool = False,
    json_out: Path | None = None,
    allow_quantize: bool = False,
) -> dict:
    if cfg.task == "reward":  # dpo and ppo are planned (memory/rlhf.py)
        raise UserError(
            "leantune plan does not plan reward models yet; plan the same model as classification"
        )
    if json_out is not None:
        check_new_file(json_out, "--json")
    plan = make_plan(cfg, budget, allow_recompute, allow_batch_reduce, allow_quantize)
    print(format_plan(plan))
    if json_out is not None:
        from leantune.atomic import write_json_atomic

        json_out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(json_out, plan)
    return plan
