"""LoRA through peft: W' = W + (alpha/r) B A on the targeted linear layers; the base stays frozen.

peft owns the layers, saving (`save_pretrained`, loadable by `PeftModel.from_pretrained`) and merging;
this module only maps our config onto `peft.LoraConfig` and turns peft's late, cryptic target errors
into one early line naming the layers the model actually has.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from leantune.errors import UserError
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


def apply(model, cfg: LoraConfig, ctx: MethodContext):
    import peft

    if isinstance(cfg.target_modules, list):
        check_targets(model, cfg.target_modules)
    modules_to_save = cfg.modules_to_save if cfg.modules_to_save is not None else heads_to_save(model, ctx)
    lora = peft.LoraConfig(
        task_type=PEFT_TASK[ctx.task],
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        bias=cfg.bias,
        modules_to_save=modules_to_save,
    )
    try:
        return peft.get_peft_model(model, lora)
    except ValueError as exc:  # e.g. no default targets known for this architecture
        raise UserError(f"lora: {exc}; set methods.N.target_modules explicitly") from None


SPEC = register(MethodSpec("lora", LoraConfig, apply))
