"""What the block-attaching methods (freeze, lora, adapters, ...) share: which blocks still train, their
order rules, and the count of trainable parameters per block and per kind for the summary.

Composition semantics: `freeze` decides which blocks train at all and records the frozen block indices on
the model (`leantune_frozen_blocks`); the methods that attach weights to blocks (lora, adapters) then
attach only to the blocks that still train, unless their own config names blocks explicitly.
"""

from __future__ import annotations

from typing import Any

from leantune.errors import UserError

FROZEN_ATTR = "leantune_frozen_blocks"
# Methods that attach to (or select weights in) blocks: `freeze` must come before them.
ATTACHING = frozenset(
    {
        "lora",
        "lora_sp",
        "adalora",
        "dynamic_rank",
        "split_lora",
        "adapters",
        "prefix",
        "prompt",
        "ptuning",
        "ia3",
        "bitfit",
        "layernorm",
    }
)
# Top-level module names of classification heads (peft's SEQ_CLS knows `classifier` and `score`).
HEAD_NAMES = ("classifier", "score", "classification_head")


def blocks_of(model, method: str) -> tuple[str, Any]:
    from leantune.models.structure import find_blocks

    try:
        return find_blocks(model)
    except ValueError as exc:
        raise UserError(f"{method}: {exc}; this method needs a transformer with a stack of blocks") from None


def frozen_blocks(model) -> set[int]:
    """Indices of the blocks an earlier `freeze` froze (empty without one)."""
    return set(getattr(model, FROZEN_ATTR, None) or ())


def record_frozen(model, indices: set[int]) -> None:
    # object.__setattr__: a plain attribute, not a module attribute (it must not go into the state dict)
    object.__setattr__(model, FROZEN_ATTR, frozenset(frozen_blocks(model) | set(indices)))


def target_blocks(model, method: str, explicit: list[int] | None, n_blocks: int) -> list[int]:
    """The blocks a method attaches to: the explicitly named ones, else every block `freeze` left training."""
    if explicit is not None:
        bad = [i for i in explicit if not 0 <= i < n_blocks]
        if bad or not explicit:
            raise UserError(
                f"{method}: layers={explicit} but the model has {n_blocks} blocks; "
                f"name blocks between 0 and {n_blocks - 1}"
            )
        if len(set(explicit)) != len(explicit):
            raise UserError(f"{method}: layers={explicit} names a block twice; list each block once")
        return sorted(explicit)
    frozen = frozen_blocks(model)
    chosen = [i for i in range(n_blocks) if i not in frozen]
    if not chosen:
        raise UserError(
            f"{method}: freeze froze all {n_blocks} blocks, so no block is left for {method} to attach to; "
            f"freeze fewer blocks or name blocks explicitly with methods.N.layers"
        )
    return chosen


def breakdown(model) -> dict[str, dict[str, int]]:
    """Trainable parameters per block (`outside_blocks`: embeddings, head, prompts) and per kind, where a
    kind names the method whose weights they are (lora, adapters, prompt, ia3), `head`, or `base` (the
    model's own weights left training: unfrozen blocks, biases, norms). Both add up to the total."""
    try:
        _, blocks = blocks_of(model, "breakdown")
    except UserError:
        blocks = []
    block_of = {id(p): i for i, block in enumerate(blocks) for p in block.parameters()}
    by_block: dict[str, int] = {}
    by_kind: dict[str, int] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        where = str(block_of[id(p)]) if id(p) in block_of else "outside_blocks"
        by_block[where] = by_block.get(where, 0) + p.numel()
        kind = kind_of(name)
        by_kind[kind] = by_kind.get(kind, 0) + p.numel()
    order = {str(i): i for i in range(len(blocks))}
    by_block = dict(sorted(by_block.items(), key=lambda kv: order.get(kv[0], len(order))))
    return {"trainable_by_method": by_kind, "trainable_by_block": by_block}


def kind_of(name: str) -> str:
    parts = name.split(".")
    if any(p.startswith("lora_") for p in parts):
        return "lora"
    if any(p in ("adapter_attn", "adapter_ffn") for p in parts):
        return "adapters"
    if "prompt_encoder" in parts:
        return "prompt"
    if any(p.startswith("ia3_") for p in parts):
        return "ia3"
    if any(p in HEAD_NAMES for p in parts):
        return "head"
    return "base"


def own_counts(model, kind: str) -> dict[str, Any]:
    """One kind's trainable count, total and per block, for a method's own report."""
    try:
        _, blocks = blocks_of(model, kind)
    except UserError:
        blocks = []
    block_of = {id(p): i for i, block in enumerate(blocks) for p in block.parameters()}
    per_block: dict[str, int] = {}
    total = 0
    for name, p in model.named_parameters():
        if p.requires_grad and kind_of(name) == kind:
            total += p.numel()
            where = str(block_of[id(p)]) if id(p) in block_of else "outside_blocks"
            per_block[where] = per_block.get(where, 0) + p.numel()
    return {"trainable": total, "trainable_per_block": per_block}


def train_head(model, task: str) -> list[str]:
    """Unfreeze a classification head (methods that freeze the base but do not go through peft's
    modules_to_save); returns the head's module names."""
    if task != "classification":
        return []
    heads = [n for n, _ in model.named_children() if n in HEAD_NAMES]
    for name in heads:
        for p in getattr(model, name).parameters():
            p.requires_grad_(True)
    return heads


def train_base_subset(model, method: str, ctx, explicit: list[int] | None, pick, what: str, instead: str):
    """BitFit-style methods: freeze everything, then train the base weights `pick(module_name, param_name,
    module)` selects, in the target blocks and outside the blocks where they still trained (so a
    `freeze` of the embeddings holds), plus a classification head. Returns the selected parameter names."""
    check_method_list(ctx.task, ctx.methods)
    if hasattr(model, "peft_config"):
        raise UserError(f"{method} trains base weights, which a peft adapter does not save; use one of them")
    _, blocks = blocks_of(model, method)
    targets = target_blocks(model, method, explicit, len(blocks))
    in_block = {id(p): i for i, block in enumerate(blocks) for p in block.parameters()}
    was_training = {id(p) for p in model.parameters() if p.requires_grad}
    chosen: list[str] = []
    for module_name, module in model.named_modules():
        for param_name, p in module.named_parameters(recurse=False):
            if module_name.split(".")[0] in HEAD_NAMES or not pick(module_name, param_name, module):
                continue  # the head trains whole (train_head), not as part of the subset
            block = in_block.get(id(p))
            if (block in targets) if block is not None else (id(p) in was_training):
                chosen.append(f"{module_name}.{param_name}" if module_name else param_name)
    if not chosen:
        raise UserError(f"{method}: {type(model).__name__} has no {what} to train; use {instead} instead")
    chosen_set = set(chosen)
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen_set)
    train_head(model, ctx.task)
    return chosen


def count_selected(model, names: list[str]) -> dict[str, Any]:
    wanted = set(names)
    try:
        _, blocks = blocks_of(model, "count")
    except UserError:
        blocks = []
    block_of = {id(p): i for i, block in enumerate(blocks) for p in block.parameters()}
    per_block: dict[str, int] = {}
    total = 0
    for name, p in model.named_parameters():
        if name in wanted and p.requires_grad:
            total += p.numel()
            where = str(block_of[id(p)]) if id(p) in block_of else "outside_blocks"
            per_block[where] = per_block.get(where, 0) + p.numel()
    return {"trainable": total, "trainable_per_block": per_block}


# peft methods: each wraps the model once and freezes every weight that is not its own when it does.
PEFT_METHODS = frozenset(
    {"lora", "lora_sp", "adalora", "dynamic_rank", "split_lora", "prefix", "prompt", "ptuning", "ia3"}
)
PROMPT_FAMILY = frozenset({"prefix", "prompt", "ptuning", "ia3"})
BASE_SUBSET = frozenset({"bitfit", "layernorm"})


def check_method_list(task: str, names: list[str] | tuple[str, ...]) -> None:
    """The combinations that make no sense, refused from the names alone (config validation calls this,
    so they fail before any model loads; each method's `apply` calls it again for direct use)."""
    names = tuple(names)  # a method listed twice is refused by the config, for every method
    if "freeze" in names:
        before = [n for n in names[: names.index("freeze")] if n in ATTACHING]
        if before:
            raise UserError(
                f"freeze must come before {before[0]} (freeze decides which blocks {before[0]} attaches to): "
                f"write methods: [freeze, {before[0]}, ...]"
            )
    if "adapters" in names:
        later = [n for n in names[names.index("adapters") + 1 :] if n in PEFT_METHODS | {"quant"}]
        if later:
            raise UserError(
                f"{later[0]} must come before adapters (peft freezes every weight but its own when it "
                f"wraps the model, adapters included): write methods: [..., {later[0]}, adapters]"
            )
        if "full" in names:
            raise UserError("adapters keep the base frozen, which `full` undoes: drop one of them")
    for name in names:
        if name in PROMPT_FAMILY:
            others = [n for n in names if n in PEFT_METHODS and n != name]
            if others:
                raise UserError(
                    f"{name} cannot be combined with {others[0]}: peft wraps a model with one adapter type; "
                    "keep one"
                )
        if name in BASE_SUBSET:
            others = [n for n in names if n in PEFT_METHODS]
            if others:
                raise UserError(
                    f"{name} trains base weights, which a {others[0]} adapter does not save; use one of them "
                    f"(lora trains biases too with methods.N.bias: all)"
                )
    subsets = [n for n in names if n in BASE_SUBSET]
    if len(subsets) > 1:  # each sets requires_grad over the whole model: the second undoes the first
        raise UserError(f"{subsets[0]} and {subsets[1]} each choose which base weights train; keep one")
    if "prefix" in names and task == "classification":
        raise UserError(
            "prefix: peft 0.21 cannot prefix-tune a sequence-classification model (it takes no past key "
            "values); use prompt, ptuning or lora"
        )
