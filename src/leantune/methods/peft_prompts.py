"""peft's prompt-learning methods and IA3, registered as four methods: `prefix`, `prompt`, `ptuning`, `ia3`.

- prefix (Li & Liang 2021): trained key/value vectors prepended in every block's attention, produced by an
  MLP over a small embedding table (the reparameterisation, peft `prefix_projection=True`), which trains
  more stably than free prefix vectors.
- prompt (Lester et al. 2021): trained "soft prompt" embeddings prepended to the input tokens only.
- ptuning (Liu et al. 2021, P-tuning): the soft prompt comes out of a small MLP (or LSTM) prompt encoder.
- ia3 (Liu et al. 2022): learned vectors rescale keys, values and the FFN's inner activations.

peft owns the layers, saving (`save_pretrained`, loaded by `PeftModel.from_pretrained` in `eval` and
`export`) and, for IA3 only, merging. The classification head trains through peft's modules_to_save.
What does not work, refused in one line: prefix tuning of a sequence-classification model (peft 0.21 on
transformers 5 needs past key values the classification models do not take: "Model does not support past
key values"); prefix after a `freeze` of blocks (peft gives every block a prefix); any of these stacked
with another peft method (peft wraps a model once per adapter type).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from leantune.errors import UserError
from leantune.methods import _blocks
from leantune.methods.registry import MethodConfig, MethodContext, MethodSpec, register


class _VirtualTokens(MethodConfig):
    """The three prompt-learning configs: their virtual tokens take positions before every input."""

    num_virtual_tokens: int

    def added_positions(self) -> int:
        return self.num_virtual_tokens


class PrefixConfig(_VirtualTokens):
    name: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(20, gt=0, description="Prefix length (key/value positions per block).")
    encoder_hidden_size: int | None = Field(
        None, gt=0, description="Width of the reparameterisation MLP; null: the model's hidden size."
    )


class PromptConfig(_VirtualTokens):
    name: Literal["prompt"] = "prompt"
    num_virtual_tokens: int = Field(20, gt=0, description="Soft-prompt length in tokens.")


class PtuningConfig(_VirtualTokens):
    name: Literal["ptuning"] = "ptuning"
    num_virtual_tokens: int = Field(20, gt=0, description="Soft-prompt length in tokens.")
    encoder_hidden_size: int | None = Field(
        None, gt=0, description="Width of the prompt encoder; null: the model's hidden size."
    )
    encoder_type: Literal["mlp", "lstm"] = "mlp"
    encoder_dropout: float = Field(0.0, ge=0, lt=1)


class Ia3Config(MethodConfig):
    name: Literal["ia3"] = "ia3"
    target_modules: list[str] | None = Field(
        None, description="Layers whose output (or, for FFN ones, input) is rescaled; null: peft's default."
    )
    feedforward_modules: list[str] | None = Field(
        None, description="Which targets are FFN layers (rescaled on their input); null: peft's default."
    )
    layers: list[int] | None = Field(
        None, description="Blocks that get IA3; null: every block (after freeze: every block still training)."
    )


def _check_combination(model, cfg, ctx: MethodContext) -> None:
    _blocks.check_method_list(ctx.task, ctx.methods)
    if hasattr(model, "peft_config"):
        raise UserError(f"{cfg.name} cannot be combined with another peft method: peft wraps a model once")


def context_length(model) -> int | None:
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_length(model, cfg) -> None:
    """The backstop when a method is applied without a run config; a run checks model.max_length plus
    the virtual tokens against the positions before the model loads (recipes/train.py)."""
    limit = context_length(model)
    if limit is not None and cfg.num_virtual_tokens >= limit:
        raise UserError(
            f"{cfg.name}: num_virtual_tokens={cfg.num_virtual_tokens} leaves no room for input in the "
            f"model's context of {limit} positions; set methods.N.num_virtual_tokens below {limit}"
        )


def _ia3_block_targets(model, cfg) -> str | list[str] | None:
    """IA3Config has no `layers_to_transform` in peft 0.21: a full-name regex over the chosen blocks."""
    import re

    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as DEFAULTS

    prefix, blocks = _blocks.blocks_of(model, "ia3")
    layers = _blocks.target_blocks(model, "ia3", cfg.layers, len(blocks))
    if cfg.layers is None and layers == list(range(len(blocks))):
        return cfg.target_modules
    names = cfg.target_modules or DEFAULTS.get(getattr(model.config, "model_type", ""))
    if not names:
        raise UserError("ia3: peft knows no default targets for this model; set methods.N.target_modules")
    alternatives = "|".join(re.escape(n) for n in names)
    return rf"{re.escape(prefix)}\.({'|'.join(map(str, layers))})\.(.*\.)?({alternatives})"


def _peft_config(model, cfg, ctx: MethodContext):
    import peft

    from leantune.methods.lora import PEFT_TASK, heads_to_save

    task = PEFT_TASK[ctx.task]
    if cfg.name == "ia3":
        from leantune.methods.lora import check_targets

        if cfg.target_modules:
            check_targets(model, cfg.target_modules)
        targets = cfg.target_modules
        if cfg.layers is not None or _blocks.frozen_blocks(model):
            targets = _ia3_block_targets(model, cfg)
        return peft.IA3Config(
            task_type=task,
            target_modules=targets,
            feedforward_modules=cfg.feedforward_modules,
            modules_to_save=heads_to_save(model, ctx),
        )
    _check_length(model, cfg)
    common = {"task_type": task, "num_virtual_tokens": cfg.num_virtual_tokens}
    if cfg.name == "prompt":
        return peft.PromptTuningConfig(**common)
    hidden = cfg.encoder_hidden_size or model.config.hidden_size
    if cfg.name == "ptuning":
        return peft.PromptEncoderConfig(
            **common,
            encoder_hidden_size=hidden,
            encoder_reparameterization_type=cfg.encoder_type.upper(),
            encoder_dropout=cfg.encoder_dropout,
        )
    if ctx.task == "classification":
        raise UserError(
            f"prefix: peft {peft.__version__} cannot prefix-tune a sequence-classification model "
            f"({type(model).__name__} takes no past key values); use prompt, ptuning or lora"
        )
    if _blocks.frozen_blocks(model):
        raise UserError(
            "prefix: peft gives every block a prefix and cannot leave frozen blocks out; drop freeze's "
            "layers or use lora/adapters on the upper blocks"
        )
    return peft.PrefixTuningConfig(**common, prefix_projection=True, encoder_hidden_size=hidden)


def apply(model, cfg, ctx: MethodContext):
    import peft

    _check_combination(model, cfg, ctx)
    if ctx.task not in ("classification", "causal_lm") and cfg.name != "ia3":
        raise UserError(f"{cfg.name}: supported for classification and causal_lm runs, not {ctx.task}")
    config = _peft_config(model, cfg, ctx)
    try:
        return peft.get_peft_model(model, config)
    except (ValueError, KeyError, AttributeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{cfg.name}: peft cannot apply it to {type(model).__name__}: {first}") from None


def report(model, cfg) -> dict[str, Any]:
    kind = "ia3" if cfg.name == "ia3" else "prompt"
    counts = _blocks.own_counts(model, kind)
    out: dict[str, Any] = {**counts, "head": _blocks.own_counts(model, "head")["trainable"]}
    if cfg.name != "ia3":
        out["num_virtual_tokens"] = cfg.num_virtual_tokens
    return out


CONFIGS = {"prefix": PrefixConfig, "prompt": PromptConfig, "ptuning": PtuningConfig, "ia3": Ia3Config}
SPECS = {name: register(MethodSpec(name, cls, apply, report=report)) for name, cls in CONFIGS.items()}
