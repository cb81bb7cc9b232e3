"""LoRA through peft: W' = W + (alpha/r) B A on the targeted linear layers; the base stays frozen.

peft owns the layers, saving (`save_pretrained`, loadable by `PeftModel.from_pretrained`) and merging;
this module only maps our config onto `peft.LoraConfig` and turns peft's late, cryptic target errors
into one early line naming the layers the model actually has. After a `freeze`, LoRA goes only into the
blocks that still train (peft's `layers_to_transform`), unless `layers` names blocks explicitly.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from leantune.errors import UserError
from leantune.methods import _blocks
from leantune.methods.registry import MethodConfig, MethodContext, MethodSpec, register

PEFT_TASK = {"classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}
# peft's SEQ_CLS trains heads named `classifier` or `score`; T5/BART-style models call theirs otherwise.
CLASSIFICATION_HEADS = ("classification_head",)


class LoraConfig(MethodConfig):
    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="Layer names (suffix match), 'all-linear', or null for peft's per-model default."
    )
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] | None = Field(
        None, description="Extra fully trained modules; the task head is added by peft for classification."
    )
    layers: list[int] | None = Field(
        None,
        description="Blocks that get LoRA; null: every block (after freeze: every block still training).",
    )


def check_targets(model, targets: list[str]) -> None:
    from leantune.models.structure import linear_module_names

    names = [n for n, _ in model.named_modules()]
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise UserError(
                f"lora: target module '{target}' matches no module of this model; "
                f"set methods.N.target_modules to some of: {', '.join(linear_module_names(model))}"
            )


def heads_to_save(model, ctx: MethodContext) -> list[str] | None:
    """Classification heads peft does not train by itself (it only knows `classifier` and `score`)."""
    if ctx.task != "classification":
        return None
    children = {n for n, _ in model.named_children()}
    return [h for h in CLASSIFICATION_HEADS if h in children] or None


def layer_selection(model, cfg: MethodConfig, ctx: MethodContext) -> dict[str, Any]:
    """peft's `layers_to_transform`/`layers_pattern` for the blocks this LoRA goes into ({}: every layer).

    Shared by every method that builds a peft LoRA-type adapter (lora, lora_sp, dynamic_rank, adalora), so
    all of them skip the blocks `freeze` froze; `layers` in the method's own config (where it has one)
    names blocks explicitly instead."""
    explicit = getattr(cfg, "layers", None)
    if explicit is None and not _blocks.frozen_blocks(model):
        return {}
    prefix, blocks = _blocks.blocks_of(model, cfg.name)
    layers = _blocks.target_blocks(model, cfg.name, explicit, len(blocks))
    if layers == list(range(len(blocks))) and explicit is None:
        return {}
    return {"layers_to_transform": layers, "layers_pattern": prefix.rsplit(".", 1)[-1]}


def apply(model, cfg: LoraConfig, ctx: MethodContext):
    import peft

    _blocks.check_method_list(ctx.task, ctx.methods)
    if hasattr(model, "peft_config"):
        raise UserError(
            f"{cfg.name} cannot be stacked on another peft adapter (peft wraps a model once); keep one"
        )
    if isinstance(cfg.target_modules, list):
        check_targets(model, cfg.target_modules)
    selection = layer_selection(model, cfg, ctx)
    modules_to_save = cfg.modules_to_save if cfg.modules_to_save is not None else heads_to_save(model, ctx)
    lora = peft.LoraConfig(
        task_type=PEFT_TASK[ctx.task],
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        bias=cfg.bias,
        modules_to_save=modules_to_save,
        **selection,
    )
    try:
        return peft.get_peft_model(model, lora)
    except ValueError as exc:  # e.g. no default targets known for this architecture
        raise UserError(f"lora: {exc}; set methods.N.target_modules explicitly") from None


def report(model, cfg: LoraConfig) -> dict[str, Any]:
    """LoRA's own trainable parameters, in total and per block (the head peft trains counts as `head`)."""
    counts = _blocks.own_counts(model, "lora")
    return {**counts, "head": _blocks.own_counts(model, "head")["trainable"]}


SPEC = register(MethodSpec("lora", LoraConfig, apply, report=report))
