"""`methods: auto` and `leantune plan --auto`: the method list with the shortest expected time to quality
that fits a memory budget, resolved before the trainer sees the config.

The trainer never branches on a method's name, so `auto` is not a method: it is a request that this
module turns into a concrete list (and the levers that go with it: `train.lr`, the frozen-prefix cache)
before `prepare` runs. The choice, and one line explaining each part of it, go to `methods_auto.json`
in the run folder, the run log and summary.json; `--resume` reads that file back instead of choosing
again (a fraction budget or a changed machine could otherwise pick another list mid-run).

The decision rule (docs/methods/auto.md, with the artefacts behind each number):

    expected time to quality = steps to quality x time per step
    steps to quality         = the run's planned steps x a per-family multiplier (STEP_PRIOR), the
                               steps the family needs to reach what full fine-tuning reaches in as many
                               steps, read off committed eval curves (MiniLM on Rotten Tomatoes) or,
                               where none exist, a stated prior
    time per step            = model FLOPs per token from the run's own FLOP profile
                               (models/flop_profile.py): forward 2 N_run, backward 2 N_backward +
                               2 N_trainable; with the frozen-prefix cache, epochs after the first skip
                               the frozen blocks' forward

Only candidates whose memory-model estimate (memory/estimate.py, memory/full_step.py; plus the prefix
cache's RAM, bounded by train.prefix_cache_ram) fits the budget compete. Candidates within TIE of the
fastest are ranked by the final quality their family reached in the same artefacts (QUALITY_ORDER):
the model's resolution is no finer than that (one seed, priors), and it should not trade quality for a
difference it cannot see. Times are relative to full fine-tuning (the unit is one full step); no
wall-clock peak is measured here, so planning stays cheap.

Why not a library: no fine-tuning library picks a method against a memory budget (peft, TRL and
accelerate all take the method as given); this is leantune's own planner layer over its memory model.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from leantune.config import AutoConfig, Config, prefix_cache_possible
from leantune.errors import UserError
from leantune.models.flop_profile import flops_per_token

#: the run-folder file that holds the resolved choice (runfolder.OWN_NAMES)
RECORD = "methods_auto.json"

#: steps to reach full fine-tuning's quality, relative to full's own steps. Evidence in
#: docs/methods/auto.md: seed003-unified RT curves (eval at 100 and 200 steps, each family at its best
#: rate): full 0.819 at 100 steps; LoRA r8 reaches 0.819 at ~133 steps (1.33); freeze-3 of 6 at ~175
#: (1.75 = 1 + 1.5 x 3/6). adalomo, lomo and mezo have no committed curve here: those are priors
#: (AdaLomo and LOMO from their papers' "comparable to AdamW" at more epochs; MeZO's ~100x more steps).
STEP_PRIOR = {"full": 1.0, "lora": 1.33, "adalomo": 1.2, "lomo": 1.5, "mezo": 100.0}
FREEZE_SLOPE = 1.5  # freezing k of B blocks multiplies the steps by 1 + FREEZE_SLOPE * k / B
#: where each family's steps multiplier comes from (docs/methods/auto.md says which artefact)
EVIDENCE_KIND = {
    "full": "measured",
    "lora": "measured",
    "freeze": "measured at 3 of 6 blocks, linear in k",
    "freeze_lora": "prior: freeze x LoRA",
}
#: candidates within this share of the fastest are ranked by QUALITY_ORDER instead
TIE = 0.15
#: final validation accuracy order on RT in seed001-table1-sweep / seed003-unified (best rate each)
QUALITY_ORDER = ("full", "lora", "freeze", "freeze_lora", "adalomo", "lomo", "mezo")
#: the best rate per family in those sweeps (a prior for other models and tasks)
LR = {"full": 1e-4, "lora": 3e-3, "freeze": 2e-4, "freeze_lora": 3e-3}
#: a LoRA step's time over what its FLOPs predict, measured: seed000-table2-core (same invocation, MiniLM
#: on RT, 268 steps) took 180.5 s for LoRA r8 and 234.4 s for full, 0.770 of full where the FLOP model
#: says 0.673 (peft's extra small matmuls, dropout and adapter bookkeeping); freeze-4 took 0.549 where
#: FLOPs say 0.562, so plain backprop needs no correction. tests/test_auto.py recomputes it.
LORA_STEP_OVERHEAD = 1.14  # evidence.json: 1.143
RANKS = (8, 4, 2, 1)  # LoRA ranks tried, largest first: r8 is the measured one, r4 within 0.01 of it


@dataclass
class Candidate:
    """One way to train: the method list, the levers, and what the models say it costs."""

    id: str
    family: str
    methods: list[dict[str, Any]]
    train: dict[str, Any]
    memory_bytes: int
    steps_multiplier: float
    flops_first_epoch: float  # model FLOPs per token in the first epoch
    flops_later: float  # ... and in later ones (the prefix cache skips the frozen blocks' forward)
    step_overhead: float = 1.0  # measured time over FLOP-predicted time (LORA_STEP_OVERHEAD)
    frozen_blocks: int = 0
    blocks: int = 0
    rank: int | None = None
    expected: float = math.inf  # time to quality in full-fine-tuning steps
    fits: bool = False


def is_auto(cfg: Config) -> bool:
    return len(cfg.methods) == 1 and isinstance(cfg.methods[0], AutoConfig)


def planned_steps(cfg: Config, n_train: int) -> tuple[int, int]:
    """(optimizer steps per epoch, steps the run plans)."""
    tc = cfg.train
    per_epoch = max(1, math.ceil(math.ceil(n_train / tc.batch_size) / tc.grad_accum))
    total = per_epoch * tc.epochs
    return per_epoch, min(total, tc.max_steps) if tc.max_steps else total


def time_to_quality(c: Candidate, full_flops: float, per_epoch: int, steps: int) -> float:
    """Expected time to quality in units of one full fine-tuning step: the candidate's steps (its
    multiplier x the planned steps), the first epoch at its uncached cost, the rest at the cached one."""
    need = c.steps_multiplier * steps
    first = min(need, per_epoch)
    flops = first * c.flops_first_epoch + (need - first) * c.flops_later
    return flops * c.step_overhead / full_flops / steps


def resolve(cfg: Config) -> tuple[Config, dict]:
    """The concrete config and the record of the choice; UserError when nothing fits the budget."""
    from leantune.recipes.plan import _load_base

    auto = cfg.methods[0]
    _, data, model = _load_base(cfg, "its lengths and size")
    record = choose(cfg, auto, model, data["train"])
    return apply_choice(cfg, record), record


def apply_choice(cfg: Config, record: dict) -> Config:
    """`cfg` with the recorded method list and levers in place of `auto`."""
    tree = cfg.model_dump(mode="json")
    tree["methods"] = record["methods"]
    tree["train"].update(record["train"])
    return Config.model_validate(tree)


def choose(cfg: Config, auto: AutoConfig, model, train_rows) -> dict:
    """Price every candidate on `model` (no method applied yet) and pick one (module docstring)."""
    from leantune.data.arrow_features import example_lengths
    from leantune.memory.budget import parse_budget
    from leantune.memory.planner import fmt_bytes

    lengths = example_lengths(train_rows)
    seq_len = min(max(lengths), cfg.model.max_length)
    mean_len = min(sum(lengths) / len(lengths), seq_len)
    budget = parse_budget(auto.budget)
    per_epoch, steps = planned_steps(cfg, len(lengths))
    ctx = _Pricing(cfg, model, seq_len, mean_len, len(lengths), per_epoch, steps)
    candidates = ctx.backprop_candidates(budget)
    full_flops = ctx.full_flops
    for c in candidates:
        c.fits = c.memory_bytes <= budget
        c.expected = time_to_quality(c, full_flops, per_epoch, steps)
    if not any(c.fits for c in candidates):  # AdamW's backprop fits nowhere: tune every weight frugally
        candidates += ctx.frugal_candidates(budget)
        for c in candidates[-3:]:
            c.expected = time_to_quality(c, full_flops, per_epoch, steps)
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        smallest = min(candidates, key=lambda c: c.memory_bytes)
        raise UserError(
            f"methods: auto: nothing fits the memory budget {auto.budget} = {fmt_bytes(budget)} (the "
            f"smallest candidate, {smallest.id}, needs {fmt_bytes(smallest.memory_bytes)}); raise the "
            "budget or shorten model.max_length / train.batch_size"
        )
    best = _pick(fitting)
    if not auto.set_lr or cfg.train.lr == "auto":
        best.train.pop("lr", None)
    if auto.extend and best.steps_multiplier > 1:
        best.train.update(_extended(cfg, best.steps_multiplier, per_epoch))
    return {
        "budget": str(auto.budget),
        "budget_bytes": budget,
        "chosen": best.id,
        "methods": best.methods,
        "train": best.train,
        "reasons": reasons(best, candidates, budget, cfg, auto),
        "planned_steps": steps,
        "steps_per_epoch": per_epoch,
        "seq_len": seq_len,
        "candidates": [_row(c) for c in candidates],
    }


def _extended(cfg: Config, multiplier: float, per_epoch: int) -> dict[str, int]:
    """The run length the time model assumes: `multiplier` x the planned steps, so that the pick can
    reach the quality full fine-tuning reaches in the planned steps (whole epochs; max_steps scaled
    when set). Early stopping (train.early_stopping_patience) still ends it sooner on a plateau."""
    tc = cfg.train
    if tc.max_steps:
        steps = math.ceil(tc.max_steps * multiplier)
        return {"max_steps": steps, "epochs": max(tc.epochs, math.ceil(steps / per_epoch))}
    return {"epochs": math.ceil(tc.epochs * multiplier)}


def _pick(fitting: list[Candidate]) -> Candidate:
    """The fastest, unless another within TIE of it reached a higher final quality in the artefacts."""
    fastest = min(c.expected for c in fitting)
    close = [c for c in fitting if c.expected <= fastest * (1 + TIE)]
    return min(close, key=lambda c: (QUALITY_ORDER.index(c.family), c.expected))


def _row(c: Candidate) -> dict:
    return asdict(c)


class _Pricing:
    """The memory and FLOP models of each candidate on one loaded base model."""

    def __init__(
        self, cfg: Config, model, seq_len: int, mean_len: float, n_train: int, per_epoch: int, steps: int
    ):
        from leantune.models.flop_profile import flop_profile
        from leantune.models.structure import find_blocks

        self.cfg, self.model, self.seq_len, self.mean_len = cfg, model, seq_len, mean_len
        self.n_train, self.per_epoch, self.steps = n_train, per_epoch, steps
        self.blocks = len(find_blocks(model)[1])
        self.hidden = int(getattr(model.config, "hidden_size", 0) or getattr(model.config, "d_model", 0))
        self.can_cache = prefix_cache_possible(cfg)
        full = copy.deepcopy(model)
        for p in full.parameters():
            p.requires_grad_(True)
        self.full_profile = flop_profile(full)
        self.full_flops = flops_per_token(self.full_profile)

    def _applied(self, methods: list[dict]):
        from leantune.methods import MethodContext, apply_methods
        from leantune.methods.registry import method_config_class
        from leantune.models.reward import method_task

        configs = [method_config_class(m["name"]).model_validate(m) for m in methods]
        ctx = MethodContext(task=method_task(self.cfg.task), seed=self.cfg.train.seed)
        return apply_methods(copy.deepcopy(self.model), configs, ctx)

    def _memory(self, model) -> int:
        from leantune.memory.estimate import estimate_memory
        from leantune.models.reward import method_task

        task = method_task(self.cfg.task)
        return estimate_memory(model, task, self.cfg.train.batch_size, self.seq_len, "adamw").total_bytes

    def cache_bytes(self) -> int:
        """RAM the frozen-prefix cache holds: one hidden state per training token (fp32), up to the
        train.prefix_cache_ram bound (the rest is spilled to a file in the run folder, not RAM)."""
        from leantune.memory.budget import parse_budget

        whole = int(self.n_train * self.mean_len * self.hidden * 4)
        return min(whole, parse_budget(self.cfg.train.prefix_cache_ram))

    def candidate(self, cid: str, family: str, methods: list[dict], frozen: int = 0, rank=None) -> Candidate:
        from leantune.models.flop_profile import flop_profile

        model = self._applied(methods)
        profile = flop_profile(model)
        memory = self._memory(model)
        mult = STEP_PRIOR["lora" if "lora" in family else "full"]
        mult *= 1 + FREEZE_SLOPE * frozen / self.blocks
        # the cache pays from the second epoch on: only when the steps to quality span more than one
        cache = bool(frozen) and self.can_cache and mult * self.steps > self.per_epoch
        train: dict[str, Any] = {"lr": LR[family], "cache_frozen_prefix": cache}
        if cache:
            memory += self.cache_bytes()
        first = flops_per_token(profile)
        later = flops_per_token(profile, frozen) if cache else first
        overhead = LORA_STEP_OVERHEAD if "lora" in family else 1.0
        return Candidate(
            cid, family, methods, train, memory, mult, first, later, overhead, frozen, self.blocks, rank
        )

    def backprop_candidates(self, budget: int) -> list[Candidate]:
        """full; LoRA on all blocks; freeze the lower half or all but the top third, training the rest
        fully or with LoRA. The LoRA rank is the largest of RANKS that fits (rank barely moves memory:
        the base weights and activations dominate; the steps prior was measured at r8)."""
        out = [self.candidate("full", "full", [{"name": "full"}])]
        out.append(self._lora("lora", "lora", [], 0, budget))
        for k in sorted({self.blocks // 2, self.blocks - max(1, self.blocks // 3)}):
            if 0 < k < self.blocks:
                freeze = {"name": "freeze", "layers": k}
                out.append(self.candidate(f"freeze{k}", "freeze", [freeze], frozen=k))
                out.append(self._lora(f"freeze{k}_lora", "freeze_lora", [freeze], k, budget))
        return out

    def _lora(self, cid: str, family: str, before: list[dict], frozen: int, budget: int) -> Candidate:
        c = None
        for r in RANKS:
            c = self.candidate(f"{cid}_r{r}", family, [*before, {"name": "lora", "r": r}], frozen, r)
            if c.memory_bytes <= budget:
                return c
        return c  # type: ignore[return-value]  # r1, which does not fit either

    def frugal_candidates(self, budget: int) -> list[Candidate]:
        """adalomo, lomo, mezo: every weight tuned without AdamW's gradients and state (recipes/plan.py's
        `full_parameter_options`, the memory model of memory/full_step.py). MeZO runs two forward passes
        and no backward; the other two a full backward."""
        from leantune.models.reward import method_task
        from leantune.recipes.plan import FULL_PARAMETER_METHODS, full_parameter_options

        task = method_task(self.cfg.task)
        full = full_parameter_options(self.model, task, self.cfg.train.batch_size, self.seq_len, budget)
        out = []
        for name in FULL_PARAMETER_METHODS:
            flops = 4.0 * self.full_profile["matmul_total"] if name == "mezo" else self.full_flops
            memory = int(full["peak_bytes"][name])
            c = Candidate(name, name, [{"name": name}], {}, memory, STEP_PRIOR[name], flops, flops, 1.0)
            c.blocks, c.fits = self.blocks, memory <= budget
            out.append(c)
        return out


def _lr_text(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def reasons(best: Candidate, candidates: list[Candidate], budget: int, cfg: Config, auto) -> list[str]:
    """One line per choice: method, blocks, rank, levers (cache, rate), and what was passed over."""
    from leantune.memory.planner import fmt_bytes

    measured = EVIDENCE_KIND.get(best.family, "prior")
    lines = [
        f"method {best.id}: expected {best.expected:.2f} full-step units to full fine-tuning's quality "
        f"({best.steps_multiplier:.2f}x its steps [{measured}], {best.flops_first_epoch / 1e6:.1f} MFLOP "
        f"per token), {fmt_bytes(best.memory_bytes)} of the {fmt_bytes(budget)} budget"
    ]
    if best.frozen_blocks:
        upper = (
            best.frozen_blocks
            if best.blocks - best.frozen_blocks == 1
            else f"{best.frozen_blocks}-{best.blocks - 1}"
        )
        lines.append(f"blocks: lowest {best.frozen_blocks} of {best.blocks} frozen, block(s) {upper} train")
    else:
        lines.append(f"blocks: all {best.blocks} train")
    if best.rank is not None:
        lines.append(f"rank: {best.rank}, the largest of {'/'.join(map(str, RANKS))} that fits the budget")
    else:
        lines.append("rank: none (every weight of the trained blocks is tuned)")
    if best.train.get("cache_frozen_prefix"):
        saved = 1 - best.flops_later / best.flops_first_epoch
        lines.append(
            f"prefix cache: on, epochs after the first skip the {best.frozen_blocks} frozen blocks' forward "
            f"({saved:.0%} of a step's FLOPs)"
        )
    elif best.frozen_blocks:
        lines.append("prefix cache: off (the steps to quality fit in one epoch: it would never be read)")
    else:
        lines.append("prefix cache: off (the lowest block trains)")
    if "epochs" in best.train:
        steps = (
            f", train.max_steps {cfg.train.max_steps} -> {best.train['max_steps']}"
            if "max_steps" in best.train
            else ""
        )
        lines.append(
            f"train.epochs {cfg.train.epochs} -> {best.train['epochs']}{steps}: {best.id} needs "
            f"{best.steps_multiplier:.2f}x full fine-tuning's steps to reach its quality "
            "(extend: false keeps the run length)"
        )
    if "lr" in best.train:
        lines.append(f"train.lr {_lr_text(best.train['lr'])}: the best rate of this family in the RT sweeps")
    else:
        why = "train.lr=auto runs the range test" if cfg.train.lr == "auto" else "kept"
        lines.append(f"train.lr: {why} ({cfg.train.lr})")
    others = sorted((c for c in candidates if c is not best), key=lambda c: c.expected)
    passed = ", ".join(
        f"{c.id} {c.expected:.2f}" + ("" if c.fits else f" (needs {fmt_bytes(c.memory_bytes)})")
        for c in others
    )
    lines.append(f"passed over (expected time; within {TIE:.0%} the higher-quality family wins): {passed}")
    return lines


def format_choice(record: dict) -> str:
    """What `plan --auto` prints and the run's banner shows: one line per choice."""
    return "\n".join(f"auto: {line}" for line in record["reasons"])


def read_record(out: Path) -> dict | None:
    path = out / RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{path} is unreadable; restore it or start a new run (without --resume)") from None


def resolve_for_run(cfg: Config, resume: bool) -> tuple[Config, dict | None]:
    """The config `prepare` gets: `auto` resolved (or, on --resume, the run's recorded choice reused),
    and the record for the summary. Configs without auto pass through (a resumed auto run's own
    config.yaml already holds the resolved list; its record is still carried into the summary)."""
    out = Path(cfg.output.dir).expanduser()
    record = read_record(out) if resume else None
    if not is_auto(cfg):
        return cfg, record
    if resume and record is None:
        raise UserError(
            f"methods: auto cannot resume {out}: it holds no {RECORD} (the choice of its first start); "
            f"resume with `leantune train {out / 'config.yaml'} --resume`"
        )
    if record is not None:
        asked = str(cfg.methods[0].budget)
        if asked != record["budget"]:
            import sys

            print(
                f"leantune: warning: resuming {out} with the choice made for budget {record['budget']} "
                f"({record['chosen']}); the config now asks {asked}, which a resume does not re-plan",
                file=sys.stderr,
            )
        return apply_choice(cfg, record), {**record, "reused_on_resume": True}
    _check_world(cfg.methods[0].budget)
    return resolve(cfg)


def _check_world(budget: str | float) -> None:
    """Every process of a launch resolves `auto` itself; a fraction of each one's available memory could
    differ between them and so could the pick: under a launcher the budget must be bytes."""
    from leantune.train.distributed import launch_world

    try:
        fraction = float(budget) <= 1
    except ValueError:
        fraction = False
    if fraction and launch_world()[1] > 1:
        raise UserError(
            f"methods: auto with budget {budget} (a fraction of each process's available memory) could "
            "pick differently on each process of this launch; give the budget in bytes (e.g. 8GiB)"
        )


def run_auto_plan(cfg: Config, budget: str | None, json_out: Path | None = None) -> dict:
    """`leantune plan --auto [--memory-budget X]`: the choice `methods: auto` would make, one line per
    part of it; nothing is written unless `--json` is given. Without --memory-budget the config's own
    `{name: auto, budget: ...}` (or auto's default) is used."""
    from leantune.outputs import check_new_file

    if budget is not None:
        from leantune.memory.budget import check_budget

        try:
            check_budget(budget)
        except ValueError as exc:
            raise UserError(f"--memory-budget: {exc}") from None
        auto = AutoConfig(budget=budget)
    else:
        auto = cfg.methods[0] if is_auto(cfg) else AutoConfig()
    if json_out is not None:
        check_new_file(json_out, "--json")
    tree = cfg.model_dump(mode="json")
    tree["methods"] = [auto.model_dump(mode="json")]
    _, record = resolve(Config.model_validate(tree))
    print(format_choice(record))
    if json_out is not None:
        from leantune.atomic import write_json_atomic

        json_out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(json_out, record)
    return record
