"""`leantune plan`: the per-layer rank plan for a memory budget, printed without training.

It runs exactly what `dynamic_rank` runs when training starts (its public `score_layers`,
`complexity_of` and `plan_ranks_for`: probe importance, task complexity, the planner under the memory
model), on the config's data and model, and writes nothing unless `--json` is given. With
`--allow-quantize` the saving of a 4-bit base is what the `quant` method's `plan_for` hook says.
Configs without a `dynamic_rank` method are planned with its defaults over the LoRA method's
targets, so `leantune plan configs/default.yaml --memory-budget 1GiB` works too.

`--world-size N` answers another question: the bytes one of N processes holds when the config (its
methods as they are) trains data-parallel in `train.distributed`'s mode: DDP replicates weights,
gradients and optimizer state, FSDP shards them (`leantune.memory.sharding`). `--global-batch G` keeps
the global batch fixed (each process then takes G / (N x grad_accum) rows per micro-batch); without it
`train.batch_size` is per process, as in `leantune train`.

Tasks dpo and ppo plan the policy's ranks within the budget left after what those tasks hold beside the
policy (memory/rlhf.py): the frozen reference (none with an adapter), the reference's logits, and for
PPO the reward model (taken as the same architecture as the policy) and the policy's value head; a DPO
step carries chosen and rejected rows, twice the batch.
"""

from __future__ import annotations

from pathlib import Path

from leantune.config import Config
from leantune.errors import UserError
from leantune.memory.rlhf import rows_per_example
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
    from leantune.memory.budget import parse_budget
    from leantune.methods import MethodContext, apply_methods, get_method
    from leantune.methods.dynamic_rank import complexity_of, plan_ranks_for, score_layers
    from leantune.models.reward import method_task

    index, method = _method_config(cfg, budget)
    budget_bytes = parse_budget(method.budget)  # a fraction means of what is available before loading
    tok, data, model = _load_base(cfg, "probe batches")
    seq_len = min(longest_example(cfg.task, data["train"]), cfg.model.max_length)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # PPO's reward model
    full = full_parameter_options(model, cfg.task, cfg.train.batch_size, seq_len, budget_bytes, base_bytes)
    methods = [m for m in cfg.methods if m.name not in ("lora", "dynamic_rank")]
    methods.insert(min(index, len(methods)), method)
    task = method_task(cfg.task)  # a DPO/PPO policy is planned as the causal LM it is
    model = apply_methods(model, methods, MethodContext(task=task, seed=cfg.train.seed))
    if cfg.task == "reward":  # the probe's loss is the pair loss, over chosen and rejected rows
        from leantune.models.reward import attach_pair_loss

        attach_pair_loss(model)
    if cfg.task == "prompt_classification":  # the probe batches carry label positions
        from leantune.models.prompt_head import setup_label_words

        setup_label_words(model, tok, cfg.data, cfg.model.name)
    train = _probe_rows(cfg.task, data["train"])
    importance, probe_loss = score_layers(model, method, train, cfg.train.batch_size, tok.pad_token_id)
    complexity = complexity_of(data["train"], len(cfg.data.label_names or []), probe_loss)
    held = _rlhf_held(cfg, model, seq_len, base_bytes)
    quant = get_method("quant")
    plan = plan_ranks_for(
        model,
        method,
        importance,
        complexity,
        task=task,
        seq_len=seq_len,
        batch_size=cfg.train.batch_size * rows_per_example(cfg.task),
        budget=budget_bytes - (held["total"] if held else 0),
        allow_recompute=allow_recompute,
        allow_batch_reduce=allow_batch_reduce,
        allow_quantize=allow_quantize,
        quantize_with=quant.plan_for(model, quant.config_cls(bits=4)) if allow_quantize else None,
    )
    out = {
        **plan.to_dict(),
        "seq_len": seq_len,
        "task_complexity": complexity,
        "budget": str(method.budget),
        "full_parameter": full,
        "evaluation": evaluation_phase(cfg, model, data, plan.estimate, budget_bytes),
    }
    return {**out, "rlhf": {**held, "asked_bytes": budget_bytes}} if held else out


def evaluation_phase(cfg: Config, model, data: dict, estimate: dict, budget: int) -> dict | None:
    """The evaluation pass beside the planned step: the weights and optimizer state stay, gradients and
    activations are gone, and one no-grad forward runs `eval.batch_size` rows (a causal LM's logits and
    their log-softmax whole). Whether it, not the training step, sets the peak, and, where it exceeds the
    budget, the largest eval.batch_size that fits (the forward scales with the rows)."""
    from leantune.memory.estimate import eval_forward_bytes

    shape = eval_shape(cfg, data)
    if shape is None:
        return None
    rows = eval_rows_per_rank(cfg, shape, 1)
    forward = eval_forward_bytes(model, method_task(cfg.task), shape[1], rows)
    held = estimate["weights"] + estimate["optimizer_state"]
    out = {"batch": rows, "seq_len": shape[1], "forward": forward, "peak": held + forward}
    out |= {"sets_peak": out["peak"] > estimate["total"], "fits": out["peak"] <= budget}
    if not out["fits"]:
        per_row = max(1, forward // rows)
        fitting = max(0, (budget - held) // per_row) // rows_per_example(cfg.task)
        out["fitting_eval_batch_size"] = int(min(fitting, cfg.eval.batch_size))
    return out


def evaluation_line(evaluation: dict, budget: int) -> str:
    from leantune.memory.planner import fmt_bytes

    e = evaluation
    line = (
        f"evaluation pass: batch {e['batch']} x {e['seq_len']} tokens, peak {fmt_bytes(e['peak'])} (weights, "
        f"optimizer state, a no-grad forward of {fmt_bytes(e['forward'])}): "
        + ("it sets the peak, not the training step" if e["sets_peak"] else "below the training step")
    )
    if not e["fits"]:
        line += f"; over the budget {fmt_bytes(budget)}: eval.batch_size={e['fitting_eval_batch_size']} fits"
    return line


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


#: methods that tune every weight without AdamW's gradients and state, in the order plan proposes them
#: (best quality per step first: AdaLomo adapts its rate, LOMO is plain SGD, MeZO needs far more steps)
FULL_PARAMETER_METHODS = ("adalomo", "lomo", "mezo")


def full_parameter_options(
    model, task: str, batch_size: int, seq_len: int, budget: int, reward_weight_bytes: int = 0
) -> dict:
    """Peak memory of one full fine-tuning step with AdamW and with each memory-frugal method (their
    `plan_for` hooks, memory/full_step.py), on the model with every weight trainable, and which fit.
    Tasks dpo/ppo: the policy's step on the rows one pass carries (a DPO pair is two), plus what the task
    holds beside it when every weight is tuned (`memory.rlhf.full_parameter_held`: the reference as a
    whole copy, its logits, PPO's reward model of `reward_weight_bytes` and value head)."""
    from leantune.memory.full_step import step_estimate
    from leantune.memory.rlhf import full_parameter_held
    from leantune.methods import get_method

    held = None
    if task in ("dpo", "ppo"):
        held = full_parameter_held(model, task, batch_size, seq_len, reward_weight_bytes)
    batch_size, task = batch_size * rows_per_example(task), method_task(task)
    trainable = {p: p.requires_grad for p in model.parameters()}
    for p in trainable:
        p.requires_grad_(True)
    try:
        peaks = {"adamw": step_estimate(model, task, batch_size, seq_len)["total"]}
        for name in FULL_PARAMETER_METHODS:
            spec = get_method(name)
            peaks[name] = step_estimate(
                model, task, batch_size, seq_len, spec.plan_for(model, spec.config_cls())
            )["total"]
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
    if held:
        peaks = {name: peak + held["total"] for name, peak in peaks.items()}
    fits = [n for n in FULL_PARAMETER_METHODS if peaks[n] <= budget]
    out = {"peak_bytes": peaks, "adamw_fits": peaks["adamw"] <= budget, "fitting_methods": fits}
    return {**out, "held_beside_policy": held} if held else out


def full_parameter_line(full: dict, budget: int) -> str:
    """One line: does AdamW full fine-tuning fit, and if not, which full-parameter method would."""
    from leantune.memory.planner import fmt_bytes

    held = full.get("held_beside_policy")
    if held:  # dpo/ppo: every figure below includes what the task holds beside the policy
        return _full_parameter_line(full, budget) + (
            f" [each with {fmt_bytes(held['total'])} held beside the policy: reference copy "
            f"{fmt_bytes(held['reference_weights'])}, reference logits {fmt_bytes(held['reference_logits'])}"
            + (
                f", reward model {fmt_bytes(held['reward_model_weights'])}"
                if held["reward_model_weights"]
                else ""
            )
            + "]"
        )
    return _full_parameter_line(full, budget)


def _full_parameter_line(full: dict, budget: int) -> str:
    from leantune.memory.planner import fmt_bytes

    peaks = full["peak_bytes"]
    if full["adamw_fits"]:
        return f"full fine-tuning: AdamW fits ({fmt_bytes(peaks['adamw'])} of {fmt_bytes(budget)})"
    others = ", ".join(f"{n} {fmt_bytes(peaks[n])}" for n in FULL_PARAMETER_METHODS)
    if not full["fitting_methods"]:
        return (
            f"full fine-tuning: AdamW needs {fmt_bytes(peaks['adamw'])} > {fmt_bytes(budget)}, and no "
            f"memory-frugal method fits either ({others}): tune an adapter (the plan below)"
        )
    best = full["fitting_methods"][0]
    return (
        f"full fine-tuning: AdamW needs {fmt_bytes(peaks['adamw'])} > {fmt_bytes(budget)}; "
        f"methods: [{best}] tunes every weight within it without AdamW's gradients/state ({others})"
    )


def _complexity_words(c: dict) -> str:
    """The task-complexity part of the plan's line, naming the signal dynamic_rank used
    (methods/_complexity.py; seed 002's label-entropy signal when the probe gave no gradient statistics)."""
    seed002 = (
        f"label entropy {c['label_entropy']:.2f}, probe loss {c['probe_loss']:.3f} = "
        f"{c['loss_vs_chance']:.2f} of chance"
    )
    if c.get("complexity_signal") == "stable_rank":
        return (
            f"task complexity {c['complexity']:.2f} (stable rank {c['stable_rank']:.2f} of the probe "
            f"gradient; "
            f"seed 002's signal {c['complexity_seed002']:.2f}: {seed002})"
        )
    return f"task complexity {c['complexity']:.2f} ({seed002})"


def format_plan(plan: dict) -> str:
    from leantune.memory.planner import fmt_bytes

    c, est, held = plan["task_complexity"], plan["estimate"], plan.get("rlhf")
    asked = held["asked_bytes"] if held else plan["budget_bytes"]  # the policy's share is budget_bytes
    lines = [
        f"memory budget {plan['budget']} = {fmt_bytes(asked)}"
        + (_rlhf_part(held, plan["budget_bytes"]) if held else "")
        + (
            f", planned within {1 - m:.2f} x {'that' if held else 'budget'}"
            if (m := plan.get("safety_margin"))
            else ""
        )
        + f"; estimate "
        f"{fmt_bytes(est['total'])} (weights {fmt_bytes(est['weights'])}, gradients "
        f"{fmt_bytes(est['gradients'])}, optimizer {fmt_bytes(est['optimizer_state'])}, activations "
        f"{fmt_bytes(est['activations'])}, transient {fmt_bytes(est['transient'])})",
        f"batch {plan['batch_size']} x {plan['seq_len']} tokens (longest training example), recomputation "
        f"{'on' if plan['recompute'] else 'off'}; {_complexity_words(c)} -> rank cap {plan['max_rank']}",
        "changed to fit: " + ("; ".join(plan["changes"]) if plan["changes"] else "nothing"),
        *(
            [full_parameter_line(plan["full_parameter"], asked)]  # computed against the whole budget
            if plan.get("full_parameter")
            else []
        ),
        *([evaluation_line(plan["evaluation"], asked)] if plan.get("evaluation") else []),
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


def _rlhf_part(held: dict, policy_bytes: int) -> str:
    """Tasks dpo/ppo: what is held beside the policy (memory/rlhf.py), taken from the user's budget
    before the policy is planned, and what that leaves for the policy."""
    from leantune.memory.planner import fmt_bytes

    return (
        f"; held beside the policy {fmt_bytes(held['total'])} (reference "
        f"{fmt_bytes(held['reference_weights'])}, reference logits {fmt_bytes(held['reference_logits'])}, "
        f"reward model {fmt_bytes(held['reward_model_weights'])}); left for the policy "
        f"{fmt_bytes(policy_bytes)}"
    )


def run_plan(
    cfg: Config,
    budget: str | None,
    allow_recompute: bool = False,
    allow_batch_reduce: bool = False,
    json_out: Path | None = None,
    allow_quantize: bool = False,
) -> dict:
    if json_out is not None:
        check_new_file(json_out, "--json")
    plan = make_plan(cfg, budget, allow_recompute, allow_batch_reduce, allow_quantize)
    print(format_plan(plan))
    if json_out is not None:
        from leantune.atomic import write_json_atomic

        json_out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(json_out, plan)
    return plan


def check_world_args(
    cfg: Config, world: int, global_batch: int | None, budget: str | None
) -> tuple[str, int]:
    """(mode, per-process micro-batch) for `plan --world-size`; refuses what no launch could run, before
    anything is loaded."""
    if budget is not None:
        raise UserError(
            "--world-size predicts per-process memory for the config's own methods, --memory-budget plans "
            "LoRA ranks for one process: pass one of them"
        )
    if world < 1:
        raise UserError(f"--world-size must be at least 1 (processes), not {world}")
    mode = cfg.train.distributed
    if mode == "none" and world > 1:
        raise UserError(
            f"train.distributed=none runs one process, but --world-size is {world}; set train.distributed "
            "to auto, ddp or fsdp, or plan --world-size 1"
        )
    mode = ("ddp" if world > 1 else "none") if mode == "auto" else mode
    accum = cfg.train.grad_accum
    if global_batch is None:
        return mode, cfg.train.batch_size
    if global_batch < 1:
        raise UserError(f"--global-batch must be at least 1 (rows per optimizer step), not {global_batch}")
    if global_batch % (world * accum):
        raise UserError(
            f"--global-batch {global_batch} does not divide over {world} processes x train.grad_accum "
            f"{accum}: use a multiple of {world * accum}, or another --world-size"
        )
    return mode, global_batch // (world * accum)


def make_rank_plan(cfg: Config, world: int, mode: str, batch: int) -> dict:
    """The memory model per process for the config's methods on `world` processes in `mode`."""
    model, seq_len, shape = load_for_rank_plan(cfg)
    return rank_plan(model, cfg, world, mode, batch, seq_len, shape)


def load_for_rank_plan(cfg: Config):
    """The model with the config's methods applied, the sequence length to plan for (the longest
    training example, capped at model.max_length) and what the data decides beside it (`data_shape`);
    separate so that a table of world sizes loads once."""
    from leantune.methods import MethodContext, apply_methods

    _, data, model = _load_base(cfg, "its lengths")
    model = apply_methods(model, cfg.methods, MethodContext(task=method_task(cfg.task), seed=cfg.train.seed))
    return model, min(longest_example(cfg.task, data["train"]), cfg.model.max_length), data_shape(cfg, data)


def data_shape(cfg: Config, data: dict) -> dict:
    """`eval`: the evaluation's (rows, tokens) (`eval_shape`); `token_ids`: the distinct token ids of
    every split (a memory-mapped, frozen input embedding is resident only at the rows they read)."""
    ids: set[int] = set()
    for split in ("train", "validation", "test"):
        for row in data.get(split) or []:
            ids.update(row["input_ids"])
    return {"eval": eval_shape(cfg, data), "token_ids": frozenset(ids)}


def eval_shape(cfg: Config, data: dict) -> tuple[int, int] | None:
    """(rows, tokens) of the largest split the run evaluates (validation, then test after training):
    its examples and its longest one, capped at model.max_length. None where nothing is evaluated by a
    forward pass (task ppo evaluates by generation; empty splits)."""

    splits = [data.get(s) for s in ("validation", "test")]
    splits = [s for s in splits if s]
    if cfg.task == "ppo" or not splits:
        return None
    rows = max(len(s) for s in splits)
    longest = max(longest_example(cfg.task, s) for s in splits)
    return rows, min(longest, cfg.model.max_length)


def longest_example(task: str, split) -> int:
    """The longest example in tokens; a preference pair's longer side (both run padded to it)."""
    from leantune.data.arrow_features import example_lengths

    longest = max(example_lengths(split))
    if rows_per_example(task) == 2:
        longest = max(longest, *example_lengths(split, "rejected_input_ids"))
    return longest


def eval_rows_per_rank(cfg: Config, evaluated: tuple[int, int] | None, world: int) -> int:
    """Rows of one evaluation pass on one of `world` ranks: its share of the split, at most
    eval.batch_size (a DPO pass carries chosen and rejected rows)."""
    if evaluated is None:
        return 0
    rows = min(cfg.eval.batch_size, -(-evaluated[0] // world))
    return rows * rows_per_example(cfg.task)


def _load_base(cfg: Config, needed: str) -> tuple:
    """The tokenizer, the encoded data and the base model (no method applied yet), as training builds
    them; an empty training split is refused, naming what the plan needs from it."""
    from leantune.models.loader import load_model, load_tokenizer
    from leantune.recipes.common import setup_torch
    from leantune.recipes.train import build_features

    setup_torch(cfg.train.seed, cfg.train.num_threads)
    tok = load_tokenizer(cfg.model.name)
    data = build_features(cfg, tok)
    if not data["train"]:
        raise UserError(f"the training split of {cfg.data.source} is empty; the planner needs {needed}")
    model = load_model(cfg.model.name, cfg.task, cfg.model.dtype, cfg.data.label_names, tok.pad_token_id)
    return tok, data, model


def rank_plan(
    model,
    cfg: Config,
    world: int,
    mode: str,
    batch: int,
    seq_len: int,
    shape: dict | None = None,
) -> dict:
    """`shape`: what the data decides (`data_shape`); None plans no evaluation and every weight read."""
    from leantune.memory.estimate import estimate_memory
    from leantune.memory.sharding import rank_memory
    from leantune.models.reward import method_task

    shape = shape or {}
    evaluated = shape.get("eval")
    eval_rows = eval_rows_per_rank(cfg, evaluated, world)
    eval_seq = evaluated[1] if evaluated else None
    rows = batch * rows_per_example(cfg.task)  # a preference pair is two sequences
    est = estimate_memory(model, method_task(cfg.task), rows, seq_len, "adamw", False, eval_rows, eval_seq)
    rank = rank_memory(model, est, world, mode, shape.get("token_ids"))
    return {**rank.to_dict(), "one_process": est.totals()}


_PHASES = {"load": "loading", "train": "training step", "eval": "evaluation pass"}


def format_rank_plan(plan: dict) -> str:
    from leantune.memory.planner import fmt_bytes

    f = fmt_bytes
    mode = {"none": "one process", "ddp": "DDP (replicated)", "fsdp": "FSDP2 (sharded)"}[plan["mode"]]
    lines = [
        f"{plan['world_size']} process(es), {mode}; per process: batch {plan['batch_per_rank']} x "
        f"{plan['seq_len']} tokens (longest training example)",
        f"per-process peak {f(plan['total'])} ({plan['total']} bytes), at "
        + plan["peak_at"].replace("_", " ")
        + f" (the {_PHASES[plan.get('peak_phase', 'train')]} sets it)",
        f"  weights {f(plan['weights'])}, gradients {f(plan['gradients'])}, optimizer state "
        f"{f(plan['optimizer_state'])}"
        + (f", DDP buckets {f(plan['ddp_buckets'])}" if plan["ddp_buckets"] else ""),
        f"  activations {f(plan['activations'])}, transient {f(plan['transient'])}, optimizer transient "
        f"{f(plan['optimizer_transient'])}",
    ]
    if plan["mode"] == "fsdp":
        lines.append(
            f"  gathered whole: root while all-gathered {f(plan['root_gather'])}, root + 2 largest blocks "
            f"{f(plan['gathered_weights'])}, root gradients + reduce-scatter copy "
            f"{f(plan['gathered_root_gradients'])}"
        )
    if plan.get("eval_forward"):
        lines.append(
            f"  evaluation: batch {plan['eval_batch_per_rank']} x {plan['eval_seq_len']} tokens per process, "
            f"forward peak {f(plan['eval_forward'])} (logits and loss, no grad); evaluation peak "
            f"{f(plan['moments']['eval'])}"
        )
    if plan.get("tied_gradients"):
        lines.append(
            f"  tied weights: their second whole gradient at the end of backward {f(plan['tied_gradients'])}"
        )
    lines.append(
        f"  loading: every process loads the model first ({f(plan['load'])}); training and evaluation peak "
        f"{f(plan['training'])}"
        + (f"; the CPU runtime's own {f(plan['runtime'])} on top" if plan["runtime"] else "")
    )
    return "\n".join(lines)


def run_rank_plan(
    cfg: Config, world: int, global_batch: int | None, budget: str | None, json_out: Path | None
) -> dict:
    mode, batch = check_world_args(cfg, world, global_batch, budget)
    if json_out is not None:
        check_new_file(json_out, "--json")
    plan = make_rank_plan(cfg, world, mode, batch)
    print(format_rank_plan(plan))
    if json_out is not None:
        from leantune.atomic import write_json_atomic

        json_out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(json_out, plan)
    return plan
