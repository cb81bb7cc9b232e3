"""LoRA whose rank per layer (0 allowed) is planned against a memory budget and re-allocated while
training runs, with the reason for every decision.

`apply` wraps every candidate layer with a rank-1 peft LoRA (the probe state). When training starts,
the runtime scores the layers on a few probe batches (`_importance`), measures task complexity (the
stable rank of the probe gradient, `_complexity`; it scales the rank cap), and
lets the planner (`leantune.memory.planner`) choose ranks that fit the budget under the memory model;
the layers are resized in place (`_lora_ranks`) and the trainer's optimizer re-reads its parameters.
Every `realloc_every` steps it re-scores the layers and re-plans when the importance has drifted or
the measured peak of the process nears the budget; shrinking truncates B A by SVD (the output moves by
at most the discarded singular values), growing appends zero columns to B (the output is unchanged).
Resized factors keep their AdamW moments, mapped into the new factors' coordinates (`_adam_carry`).
The result is a plain peft LoRA adapter with `rank_pattern`.

What "memory" means here: the memory model's total (weights, trainable parameters, gradients, AdamW
state, saved activations and transient buffers of the longest batch); it excludes the Python/torch
runtime, lazily imported libraries and the dataset. The measured counterpart comes from the trainer's
`StepPeakMeter` (`measured_step_peak`): on CUDA, torch.cuda.max_memory_allocated within the step (reset
at each step start); on CPU, the persistent part (weights and AdamW state, counted exactly) plus the
growth of the process's peak RSS within the step (VmHWM, reset at each step start, minus RSS then).
A measured peak above (1 - memory_margin) x budget re-plans against a budget scaled down by estimate /
measured. Plans fill (1 - safety_margin) x budget, room for the memory model's error. By default glibc
is told to return freed memory (`return_freed_memory`), so RSS follows live tensors; without it glibc
keeps freed pages, a step's RSS growth under-reads what it uses, and only the memory model keeps the
budget.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator

from leantune.errors import UserError
from leantune.methods.registry import MethodConfig, MethodContext, MethodRuntime, MethodSpec, register


class DynamicRankConfig(MethodConfig):
    name: Literal["dynamic_rank"] = "dynamic_rank"
    budget: str | float = Field(
        "2GiB",
        description="Memory for the model and one training step: 2GiB, 512MiB, 3e9, or a fraction"
        " (<= 1) of the memory available when training starts.",
    )
    max_rank: int = Field(16, gt=0, description="Highest rank a layer may get (before the complexity cap).")
    scaling: float = Field(2.0, gt=0, description="LoRA scaling alpha/r, fixed per layer across resizes.")
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="Candidate layers (suffix match), 'all-linear', or null for peft's default."
    )
    modules_to_save: list[str] | None = None
    probe_batches: int = Field(4, gt=0, description="Batches scored for importance at each (re)planning.")
    allocation: Literal["uniform", "importance", "softened"] = Field(
        "uniform",
        description="uniform: every layer targets the cap (max_rank scaled by task complexity), raised in"
        " importance order while the budget allows; importance: a layer's target is cap x its importance /"
        " the top importance; softened: cap x clip(sqrt(importance / mean importance), 1/4, 2).",
    )
    min_share: float = Field(
        0.1,
        ge=0,
        description="allocation: importance only: a layer whose importance share is below min_share /"
        " #layers gets rank 0.",
    )
    realloc_every: int | None = Field(
        50, gt=0, description="Steps between re-allocation checks; null: never."
    )
    drift_threshold: float = Field(
        0.1, ge=0, le=1, description="Re-plan when the importance moved this far (total variation)."
    )
    memory_margin: float = Field(
        0.05, ge=0, lt=1, description="Re-plan when the measured peak exceeds (1 - margin) x budget."
    )
    safety_margin: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Plan within (1 - margin) x budget: room for the memory model's error (at most 8.8%"
        " on the validation grid, benchmarks/results/memory-model/).",
    )
    return_freed_memory: bool = Field(
        True,
        description="On glibc, return freed tensors to the OS (mallopt M_MMAP_THRESHOLD 128 KiB) so that"
        " RSS follows live tensors, as the memory model assumes; costs page faults.",
    )
    allow_recompute: bool = Field(False, description="May switch on activation recomputation to fit.")

    @field_validator("budget")
    @classmethod
    def _budget_syntax(cls, value):
        from leantune.memory.budget import check_budget

        return check_budget(value)


def _peft_task(task: str) -> str:
    from leantune.methods.lora import PEFT_TASK

    return PEFT_TASK[task]


def apply(model, cfg: DynamicRankConfig, ctx: MethodContext):
    """Rank 1 on every candidate: the state the probes and the planner's trace start from."""
    import peft

    from leantune.memory.budget import parse_budget
    from leantune.methods.lora import check_targets, heads_to_save, layer_selection

    parse_budget(cfg.budget)  # a bad budget fails before anything is written
    if isinstance(cfg.target_modules, list):
        check_targets(model, cfg.target_modules)
    modules_to_save = cfg.modules_to_save if cfg.modules_to_save is not None else heads_to_save(model, ctx)
    lora = peft.LoraConfig(
        task_type=_peft_task(ctx.task),
        r=1,
        lora_alpha=cfg.scaling,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        modules_to_save=modules_to_save,
        **layer_selection(model, cfg, ctx),
    )
    try:
        return peft.get_peft_model(model, lora)
    except ValueError as exc:
        raise UserError(f"dynamic_rank: {exc}; set methods.N.target_modules explicitly") from None


# -- planning, shared by the runtime (when training starts and on re-allocation) and `leantune plan` --


def score_layers(
    model,
    cfg: DynamicRankConfig,
    train_data,
    batch_size: int,
    pad_id: int,
    offset: int = 0,
    complexity: bool = True,
) -> tuple[dict[str, float], float]:
    """Importance share per candidate layer and the mean loss, from `cfg.probe_batches` batches starting
    at batch `offset` of the training data (the model is left as it was). With `complexity` the loss is
    a `_complexity.ProbeLoss` that also carries the gradient statistics and a loss-fall probe over the
    same batches (`probe_batches` more forward/backward passes), which `complexity_of` reads."""
    from leantune.methods._complexity import GradStats, ProbeLoss, loss_fall_probe
    from leantune.methods._importance import layer_importance, probe_batches

    batches = probe_batches(train_data, batch_size, cfg.probe_batches, pad_id, offset)
    if not complexity:
        return layer_importance(model, batches)
    stats = GradStats()
    importance, loss = layer_importance(model, batches, stats=stats)
    probe = ProbeLoss(loss)
    probe.stats, probe.falls = stats, loss_fall_probe(model, batches)
    return importance, probe


def complexity_of(train_data, num_labels: int, probe_loss: float, batch_size: int = 32) -> dict[str, float]:
    """Task complexity that scales the rank cap: `complexity` is the candidate named by
    `_complexity.COMPLEXITY_SIGNAL`; every candidate and seed 002's signal (`complexity_seed002`: label
    entropy and probe loss vs chance) are kept alongside for the run report."""
    from leantune.methods._complexity import COMPLEXITY_SIGNAL, candidates
    from leantune.methods._importance import class_labels, task_complexity

    old = task_complexity(class_labels(train_data), num_labels, float(probe_loss))
    out = {k: v for k, v in old.items() if k != "complexity"} | {"complexity_seed002": old["complexity"]}
    out |= candidates(
        float(probe_loss),
        num_labels,
        getattr(probe_loss, "stats", None),
        getattr(probe_loss, "falls", None),
        batch_size,
    )
    chosen = out.get(f"cx_{COMPLEXITY_SIGNAL}", float("nan"))
    out["complexity"] = old["complexity"] if math.isnan(chosen) else chosen
    out["complexity_signal"] = COMPLEXITY_SIGNAL if not math.isnan(chosen) else "seed002"
    return out


def plan_ranks_for(
    model,
    cfg: DynamicRankConfig,
    importance: dict[str, float],
    complexity: dict[str, float],
    *,
    task: str,
    seq_len: int,
    batch_size: int,
    budget: int | None = None,
    recompute: bool = False,
    allow_recompute: bool = False,
    allow_batch_reduce: bool = False,
    allow_quantize: bool = False,
    quantize_with=None,
):
    """The planner's `Plan` for this model under `budget` (default: the config's). Every candidate layer
    is traced as active: a layer at rank 0 gets a rank-1 adapter with B = 0 first (outputs unchanged)."""
    import torch

    from leantune.memory.budget import parse_budget
    from leantune.memory.planner import RankCost, plan_ranks
    from leantune.methods._lora_ranks import resize
    from leantune.models.lora_sites import lora_layers, rank_of

    gen = torch.Generator().manual_seed(0)  # values are irrelevant: rank-1 factors with B = 0
    for layer in lora_layers(model).values():
        if rank_of(layer) == 0:
            resize(layer, 1, gen)
    cost = RankCost(model, task, seq_len)
    scores, level, max_rank, min_share = importance, complexity["complexity"], cfg.max_rank, cfg.min_share
    targets: dict[str, int] = {}
    if cfg.allocation == "softened":
        targets = softened_targets(importance, rank_cap(cfg.max_rank, level))
        scores, level, max_rank, min_share = _encode_targets(targets, importance)
    plan = plan_ranks(
        cost,
        scores,
        level,
        parse_budget(cfg.budget) if budget is None else budget,
        batch_size,
        max_rank,
        min_share,
        recompute=recompute,
        allow_recompute=allow_recompute or cfg.allow_recompute,
        allow_batch_reduce=allow_batch_reduce,
        safety_margin=cfg.safety_margin,
        uniform=cfg.allocation == "uniform",
        allow_quantize=allow_quantize,
        quantize_with=quantize_with,
    )
    if targets:
        _decode_plan(
            plan, importance, complexity["complexity"], rank_cap(cfg.max_rank, complexity["complexity"])
        )
    return plan


#: the softened rule: target = cap x clip((share / mean share) ** SOFTEN_POWER, SOFTEN_LOW, SOFTEN_HIGH)
SOFTEN_POWER, SOFTEN_LOW, SOFTEN_HIGH = 0.5, 0.25, 2.0


def rank_cap(max_rank: int, complexity: float) -> int:
    """The planner's complexity-scaled cap (`targets_from_importance`): max_rank x (1/4 + 3/4 complexity)."""
    from leantune.memory.planner import pow2_round

    return max(1, pow2_round(max_rank * (0.25 + 0.75 * complexity)))


def softened_targets(importance: dict[str, float], cap: int) -> dict[str, int]:
    """Targets around the uniform level instead of below it: a layer of mean importance gets the cap,
    the square root damps the importance scores' spread (in seed002's runs one probe's shares differ 7-11x
    between layers, and move by 0.1-0.4 in total variation between probes), and the clip keeps every
    layer between cap/4 and 2 cap.
    Why: importance-proportional targets (cap x share / top share) give every layer but the top one
    less than the cap, so at the same budget they train fewer ranks than uniform (issue 19)."""
    from leantune.memory.planner import pow2_round

    n = len(importance)
    return {
        name: max(1, pow2_round(cap * min(SOFTEN_HIGH, max(SOFTEN_LOW, (share * n) ** SOFTEN_POWER))))
        for name, share in importance.items()
    }


def _encode_targets(
    targets: dict[str, int], importance: dict[str, float]
) -> tuple[dict[str, float], float, int, float]:
    """Scores, complexity, max_rank and min_share under which the planner's importance rule (target =
    cap x share / top share, cap = max_rank at complexity 1) reproduces `targets` exactly, most important
    first among equal targets. Why an encoding: the planner (leantune.memory.planner) takes importance
    shares, not targets; this keeps its greedy fit, levers and messages unchanged."""
    top_share = max(importance.values()) or 1.0
    raw = {n: t * (1 + 1e-6 * importance[n] / top_share) for n, t in targets.items()}
    total = sum(raw.values())
    return {n: v / total for n, v in raw.items()}, 1.0, max(targets.values()), 0.0


def _decode_plan(plan, importance: dict[str, float], complexity: float, cap: int) -> None:
    """Put the real importance, complexity and cap back into a plan made from `_encode_targets`."""
    plan.complexity, plan.max_rank = complexity, cap
    order = sorted(importance, key=lambda n: (-importance[n], n))
    rule = f"cap {cap} x clip((share x {len(order)}) ** {SOFTEN_POWER}, {SOFTEN_LOW}, {SOFTEN_HIGH})"
    for layer in plan.layers:
        head = (
            f"importance #{order.index(layer.name) + 1} of {len(order)} (share {importance[layer.name]:.3f})"
        )
        _, _, tail = layer.reason.partition("); ")
        if "x share / top share" in tail:
            tail = f"softened target {layer.target} = {rule}, fits in budget"
        layer.reason = (
            f"rank {layer.rank}"
            + (f" (target {layer.target})" if "(target" in layer.reason else "")
            + f": {head}; {tail}"
        )
        layer.importance = importance[layer.name]


class DynamicRankRuntime(MethodRuntime):
    reshapes_parameters = True
    lr_auto_refusal = "dynamic_rank resizes its factors during training (the range test cannot undo that)"

    def __init__(self, model, cfg: DynamicRankConfig, ctx: MethodContext) -> None:
        from leantune.memory.budget import parse_budget

        self.model, self.cfg, self.ctx = model, cfg, ctx
        self.budget = parse_budget(cfg.budget)
        self.planned = False
        self.recompute = False
        self.importance: dict[str, float] = {}
        self.complexity: dict[str, float] = {}
        self.plan: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []  # {"step", "ranks"} after every (re)allocation
        self.measured_peak = 0
        self.last_step = 0
        self.run_dir = None
        self._step_peak = 0
        self.measure_source: str | None = None  # "cuda_max_allocated" or "rss" (StepPeakMeter)
        self.freed_memory_returned = False

    # -- planning ------------------------------------------------------------------------------------
    def _seq_len(self, trainer) -> int:
        longest = max(trainer.lengths, default=1)
        return min(longest, trainer.cfg.model.max_length)

    def _probe(self, trainer, offset: int, complexity: bool = False):
        return score_layers(
            self.model,
            self.cfg,
            trainer.train_data,
            trainer.cfg.train.batch_size,
            trainer.pad_id,
            offset,
            complexity,
        )

    def _plan(self, trainer, importance: dict[str, float], budget: int):
        return plan_ranks_for(
            self.model,
            self.cfg,
            importance,
            self.complexity,
            task=trainer.cfg.task,
            seq_len=self._seq_len(trainer),
            batch_size=trainer.cfg.train.batch_size,
            budget=budget,
            recompute=self.recompute,
        )

    def _apply_plan(self, trainer, plan, reason: str) -> None:
        import torch

        from leantune.memory.estimate import gradient_checkpointing
        from leantune.methods._adam_carry import carry, factor_maps
        from leantune.methods._lora_ranks import lora_factors, lora_layers, rank_of, resize, sync_peft_config

        if plan.batch_size != trainer.cfg.train.batch_size:
            raise UserError(f"dynamic_rank: the budget needs train.batch_size={plan.batch_size}; set it")
        if plan.recompute and not self.recompute:
            gradient_checkpointing(self.model, True).__enter__()  # stays on for the rest of the run
            self.recompute = True
        opt = trainer.torch_optimizer
        step = trainer.state.step
        carried: dict[str, tuple] = {}  # layer -> (old A, old B, their AdamW states, resize kind)
        changes = []
        layers = lora_layers(self.model)
        before = {n: rank_of(layer) for n, layer in layers.items()}
        shown_before = self.history[-1]["ranks"] if self.history else before
        for i, (name, layer) in enumerate(layers.items()):
            new = plan.ranks[name]
            old = rank_of(layer)
            factors = lora_factors(layer)
            gen = torch.Generator().manual_seed(hash((self.ctx.seed, step, i)) % (2**63))
            done = resize(layer, new, gen)
            if factors is not None and done["kind"] in ("grow", "shrink"):
                a, b = factors
                carried[name] = (a, b, opt.state.get(a, {}), opt.state.get(b, {}), done["kind"])
            if shown_before.get(name, old) != new:
                changes.append({"layer": name, **done, "from": shown_before.get(name, old)})
        sync_peft_config(self.model)
        trainer.sync_parameters()
        for name, (old_a, old_b, state_a, state_b, kind) in carried.items():
            a, b = lora_factors(layers[name])
            new_a, new_b = carry(state_a, state_b, factor_maps(old_a, old_b, a, b, kind))
            if new_a:
                opt.state[a], opt.state[b] = new_a, new_b
        if self.planned:  # the best checkpoint has the old shapes: track the best from here on
            trainer.state.best_metric, trainer.state.best_step, trainer.state.bad_evals = None, None, 0
        self.planned = True
        self.plan = plan.to_dict()
        ranks = {n: rank_of(layer) for n, layer in layers.items()}
        self.history.append({"step": step, "ranks": ranks})
        event = {
            "step": step,
            "event": "rank_allocation",
            "reason": reason,
            "budget_bytes": plan.budget_bytes,
            "estimate_bytes": plan.estimate["total"],
            "changes": [
                {k: v for k, v in c.items() if k != "discarded"}
                | ({"max_discarded_sv": max(c["discarded"], default=0.0)} if "discarded" in c else {})
                for c in changes
            ],
            "trainable_lora_params": sum(p.numel() for lyr in layers.values() for p in _lora_params(lyr)),
        }
        self.events.append(event)
        trainer.log.log(event)

    # -- hooks -----------------------------------------------------------------------------------------
    def check_run(self, cfg, world: int) -> None:
        """Its budget counts AdamW's two fp32 moments, and a rank change carries AdamW's moments into the
        new factors (`_adam_carry`): another optimizer's state would be dropped or mis-read."""
        if cfg.train.optimizer != "adamw":
            raise UserError(
                f"dynamic_rank plans its memory for and carries the moments of train.optimizer=adamw, not "
                f"{cfg.train.optimizer}; set train.optimizer=adamw"
            )

    def on_train_start(self, trainer) -> None:
        from leantune.memory.estimate import gradient_checkpointing

        if trainer.world > 1:
            raise UserError(
                "dynamic_rank re-shapes parameters, which DDP cannot follow; run it in one process"
            )
        self.run_dir = trainer.run_dir
        if self.cfg.return_freed_memory:
            from leantune.memory.budget import return_freed_memory

            self.freed_memory_returned = return_freed_memory()
        if self.planned:  # resumed: the checkpoint's ranks are in place already
            if self.recompute:
                gradient_checkpointing(self.model, True).__enter__()
            return
        self.importance, probe_loss = self._probe(trainer, 0, complexity=True)
        self.complexity = complexity_of(
            trainer.train_data, trainer.num_labels, probe_loss, trainer.cfg.train.batch_size
        )
        plan = self._plan(trainer, self.importance, self.budget)
        self._apply_plan(trainer, plan, "initial plan from probe importance and task complexity")

    def measured_step_peak(self, meter) -> int | None:
        """The step's peak in the memory model's terms, from the trainer's `StepPeakMeter`.

        On CUDA, max_memory_allocated within the step already holds every tensor the model counts
        (weights, gradients, AdamW state, activations). On CPU the process RSS also holds the Python and
        torch runtime and the dataset, which the model leaves out, so the measured figure is the
        persistent part counted exactly (weights, AdamW state) plus the RSS growth within the step."""
        if meter.last is None:
            return None
        if meter.source == "cuda_max_allocated":
            return meter.last
        est = self.plan["estimate"]
        return est["weights"] + est["optimizer_state"] + meter.last_growth

    def on_step_end(self, trainer) -> None:
        measured = self.measured_step_peak(trainer.step_meter)
        if measured is not None:
            self.measure_source = trainer.step_meter.source
            self._step_peak = max(self._step_peak, measured)
            self.measured_peak = max(self.measured_peak, measured)
        done = trainer.state.step + 1
        self.last_step = done
        every = self.cfg.realloc_every
        if not every or done % every or done >= trainer.total_steps:
            return
        self._reconsider(trainer, done)

    def _reconsider(self, trainer, done: int) -> None:
        from leantune.memory.planner import fmt_bytes
        from leantune.methods._importance import drift

        importance, _ = self._probe(trainer, done)
        moved = drift(self.importance, importance)
        measured, self._step_peak = self._step_peak, 0
        estimate = self.plan["estimate"]["total"]
        reasons, budget = [], self.budget
        if moved > self.cfg.drift_threshold:
            reasons.append(f"importance drifted by {moved:.3f} > {self.cfg.drift_threshold}")
        if measured > (1 - self.cfg.memory_margin) * self.budget:
            budget = int(self.budget * min(1.0, estimate / measured))
            reasons.append(
                f"measured peak {fmt_bytes(measured)} > {1 - self.cfg.memory_margin:.2f} x budget "
                f"{fmt_bytes(self.budget)}; planning against {fmt_bytes(budget)} (estimate/measured)"
            )
        check = {
            "step": trainer.state.step,
            "event": "rank_check",
            "drift": moved,
            "measured_peak_bytes": measured,
        }
        trainer.log.log(check)
        if not reasons:
            return
        self.importance = importance
        try:
            plan = self._plan(trainer, importance, budget)
        except UserError as exc:  # the scaled budget is below the minimum: keep the current ranks
            self._restore_ranks()
            trainer.log.log({"step": trainer.state.step, "event": "rank_check", "error": str(exc)})
            return
        self._apply_plan(trainer, plan, "; ".join(reasons))

    def _restore_ranks(self) -> None:
        """Undo the planner's temporary rank-1 layers (their B is zero: nothing learned is lost)."""
        import torch

        from leantune.methods._lora_ranks import lora_layers, rank_of, resize

        gen = torch.Generator().manual_seed(0)
        for name, layer in lora_layers(self.model).items():
            if self.history[-1]["ranks"][name] == 0 and rank_of(layer) > 0:
                resize(layer, 0, gen)

    # -- checkpoints and report ------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "planned": self.planned,
            "recompute": self.recompute,
            "importance": self.importance,
            "complexity": self.complexity,
            "plan": self.plan,
            "events": self.events,
            "history": self.history,
            "measured_peak": self.measured_peak,
        }

    def load(self, state: dict[str, Any], tensors: dict[str, Any]) -> None:
        """Re-shape every layer to the checkpoint's ranks before the trainer loads its weights."""
        import torch

        from leantune.methods._lora_ranks import lora_layers, resize, sync_peft_config

        for key in ("planned", "recompute", "importance", "complexity", "plan", "events", "history"):
            setattr(self, key, state[key])
        self.measured_peak = state.get("measured_peak", 0)
        if self.history:
            gen = torch.Generator().manual_seed(0)  # the checkpoint overwrites these values
            for name, layer in lora_layers(self.model).items():
                resize(layer, self.history[-1]["ranks"][name], gen)
            sync_peft_config(self.model)

    def report(self) -> dict[str, Any]:
        out = {
            "budget_bytes": self.budget,
            "ranks": self.history[-1]["ranks"] if self.history else {},
            "complexity": self.complexity,
            "plan": self.plan,
            "reallocations": len(self.events) - 1 if self.events else 0,
            "events": self.events,
            "measured_peak_bytes": self.measured_peak,
            "measured_peak_source": self.measure_source,
            "freed_memory_returned": self.freed_memory_returned,
            "trainable_params_final": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
        }
        if self.run_dir is not None and self.history:
            out["rank_plot"] = str(
                plot_history(self.history, self.run_dir / "rank_history.png", self.last_step)
            )
        return out


def _lora_params(layer):
    from leantune.methods._lora_ranks import lora_factors

    return lora_factors(layer) or ()


def plot_history(history: list[dict[str, Any]], path, last_step: int = 0):
    """Rank per layer over training steps (a step line per layer), as a PNG in the run folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(history[0]["ranks"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = [h["step"] for h in history]
    end = max(last_step, steps[-1] + max(1, math.ceil(0.05 * (steps[-1] or 1))))
    for name in names:
        ranks = [h["ranks"].get(name, 0) for h in history]
        ax.step(steps + [end], ranks + ranks[-1:], where="post", label=name.replace("base_model.model.", ""))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("LoRA rank")
    ax.set_title("dynamic_rank: rank per layer over training")
    if len(names) <= 16:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _runtime(model, cfg: DynamicRankConfig, ctx: MethodContext) -> DynamicRankRuntime:
    return DynamicRankRuntime(model, cfg, ctx)


SPEC = register(MethodSpec("dynamic_rank", DynamicRankConfig, apply, runtime=_runtime))
