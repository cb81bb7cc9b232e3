"""Quantised frozen base (QLoRA's half): 8-bit or 4-bit (NF4/FP4) linear layers.

Where it can, the base is quantised while it loads: `load_options` hands the loader a
`BitsAndBytesConfig` (`from_pretrained(quantization_config=...)`), so transformers quantises each weight
as it is read and the full-precision base never sits in memory (benchmarks/results/quant-load measures
the peak). Where it cannot (backend torch, bitsandbytes missing, a blocksize other than transformers' 64)
it says why, the base loads in full precision and the layers are replaced in place after, as before.
Both paths quantise the same weights with the same bitsandbytes call, so they give the same codes: a run
trained on one reloads on the other.

Why a method that only replaces layers: the adapter on top stays whatever the next method in the list
is (`methods: [quant, lora]` is QLoRA), so quantisation composes instead of being a LoRA option.
bitsandbytes does the work where it is installed (it has a CPU backend: LLM.int8 8-bit, NF4/FP4
4-bit, forward and backward, and peft wraps its layers); otherwise, or with `backend: torch`, our
pure-PyTorch block-wise layers (`leantune.models.quantized`) do the same job.

Never quantised: the task head (classifier/score/classification_head), the pooler and the LM head,
which stay trainable or tied to the embeddings; embeddings are not linear layers. The report gives
the weight bytes of the replaced layers before and after, so the memory saved is measured, not assumed.
The quantised base cannot be merged with an adapter or saved as a model: the saved adapter loads onto
the *unquantised* base (`PeftModel.from_pretrained`), and merging needs that full-precision base.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field, model_validator

from leantune.errors import UserError
from leantune.methods.registry import MethodConfig, MethodContext, MethodSpec, register
from leantune.models.quantizable import NEVER_QUANTIZED, quantizable_layers, skipped

__all__ = ["NEVER_QUANTIZED", "QuantConfig", "quantizable_layers", "quantize", "quantized_layers"]
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Harmless on every call or import here: 8-bit casts inputs to fp16 internally, and the optional
# `kernels` hub package (which we must not install offline) only speeds up 4-bit inference on CPU.
_NOISE = ("inputs will be cast", "kernels-community", "pip install kernels")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(s in record.getMessage() for s in _NOISE)


for _name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
    logging.getLogger(_name).addFilter(_DropNoise())


class QuantConfig(MethodConfig):
    name: Literal["quant"] = "quant"
    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit code: NF4 (QLoRA) or FP4.")
    blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = Field(
        64, description="Weights per absmax scale (4-bit, and 8-bit with backend torch)."
    )
    double_quant: bool = Field(True, description="bitsandbytes 4-bit: also quantise the block scales.")
    backend: Literal["auto", "bitsandbytes", "torch"] = Field(
        "auto", description="auto = bitsandbytes when installed, else pure PyTorch."
    )
    skip_modules: list[str] = Field(
        default_factory=list,
        description="More layer names (suffix match) to keep in full precision; heads are always kept.",
    )

    @model_validator(mode="after")
    def _bits_and_type(self) -> QuantConfig:
        # the default (nf4) passes: a saved config.yaml writes every key, and must load again
        if self.bits == 8 and self.quant_type != "nf4":
            raise ValueError("quant_type applies to bits: 4 only; drop it or set bits: 4")
        return self


def resolve_backend(cfg: QuantConfig) -> str:
    import importlib.util

    installed = importlib.util.find_spec("bitsandbytes") is not None
    if cfg.backend == "bitsandbytes" and not installed:
        raise UserError(
            "quant: backend bitsandbytes is not installed; `pip install 'leantune[quant]'` "
            "or set methods.N.backend=torch"
        )
    if cfg.backend == "auto":
        return "bitsandbytes" if installed else "torch"
    return cfg.backend


def _as_linear(module) -> Any:
    """GPT-2's Conv1D is a linear layer with a transposed weight: turn it into an nn.Linear first."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        linear = nn.Linear(module.weight.shape[0], module.weight.shape[1], device=module.weight.device)
        linear.weight = nn.Parameter(module.weight.detach().t().contiguous())
        linear.bias = module.bias
        return linear
    return module


def _bnb_layer(linear, cfg: QuantConfig):
    import bitsandbytes as bnb
    from torch import nn

    device = linear.weight.device
    weight = linear.weight.detach()
    if cfg.bits == 8:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            has_fp16_weights=False,
            threshold=6.0,  # LLM.int8's outlier threshold, as transformers' `load_in_8bit` uses
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=weight.dtype,
            compress_statistics=cfg.double_quant,
            quant_type=cfg.quant_type,
        )
        layer.weight = bnb.nn.Params4bit(
            weight,
            requires_grad=False,
            blocksize=cfg.blocksize,
            compress_statistics=cfg.double_quant,
            quant_type=cfg.quant_type,
            module=layer,
        )
        # On CPUs with AVX512-BF16, an eval pass repacks the weight into an inference-only layout and
        # the next training forward fails (bitsandbytes 0.50); the plain layout works for both.
        layer.support_avx512bf16_for_cpu = False
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return layer.to(device if device.type != "meta" else "cpu")  # `.to` is where bitsandbytes quantises


def _torch_layer(linear, cfg: QuantConfig):
    from leantune.models.quantized import BlockwiseQuantLinear

    return BlockwiseQuantLinear(linear, cfg.bits, cfg.quant_type, cfg.blocksize)


def check_order(cfg: QuantConfig, ctx: MethodContext, model) -> None:
    names = list(ctx.methods)
    here = names.index("quant") if "quant" in names else 0
    if hasattr(model, "peft_config") or any(n.startswith("lora") for n in names[:here]):
        raise UserError("quant must come before the adapter it carries: write methods: [quant, lora]")
    if "full" in names[here + 1 :]:
        raise UserError("quant freezes the base as 4/8-bit codes, which `full` cannot train: drop one")
    if names and here == len(names) - 1:
        raise UserError(
            "quant only freezes the base; put an adapter after it to train, e.g. methods: [quant, lora]"
        )


#: the blocksize transformers' BitsAndBytesConfig quantises with (it has no setting for it)
LOAD_TIME_BLOCKSIZE = 64


def load_time_blocker(cfg: QuantConfig) -> str | None:
    """Why this config cannot be quantised while the base loads, or None when it can."""
    if resolve_backend(cfg) != "bitsandbytes":
        return "backend torch (pure-PyTorch layers) replaces layers after loading"
    if cfg.bits == 4 and cfg.blocksize != LOAD_TIME_BLOCKSIZE:
        return f"blocksize {cfg.blocksize}: transformers' BitsAndBytesConfig quantises in blocks of 64 only"
    return None


def skip_patterns(cfg: QuantConfig) -> list[str]:
    """`skipped()`'s rule (a path component, or a dotted suffix) as transformers' skip patterns (regexes
    matched from the start of a module name up to a module boundary), so both paths quantise the same
    layers."""
    import re

    return [rf"(?:.*\.)?{re.escape(s)}" for s in NEVER_QUANTIZED + tuple(cfg.skip_modules)]


def load_options(cfg: QuantConfig, task: str, dtype: str) -> dict[str, Any] | None:
    """A BitsAndBytesConfig for `from_pretrained`: the base is quantised as it loads."""
    blocker = load_time_blocker(cfg)
    if blocker is not None:
        print(f"quant: loading the base in full precision, then quantising it ({blocker})", flush=True)
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=cfg.bits == 4,
            load_in_8bit=cfg.bits == 8,
            bnb_4bit_quant_type=cfg.quant_type,
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, dtype),
            llm_int8_threshold=6.0,  # LLM.int8's outlier threshold, as `_bnb_layer` uses
            llm_int8_skip_modules=skip_patterns(cfg),
        )
    }


def apply(model, cfg: QuantConfig, ctx: MethodContext):
    check_order(cfg, ctx, model)
    return quantize(model, cfg)


def reload(model, cfg: QuantConfig, run_dir) -> Any:
    """The run's adapter was trained on the quantised base: evaluate and export it on that base too.

    Quantising is deterministic (absmax per block, no randomness), so the same bits, type, blocksize and
    backend from the run's config give the same codes the run trained on, at load time or after.
    """
    return quantize(model, cfg)


def _quantized_at_load(model, cfg: QuantConfig) -> list[str]:
    """The layers transformers quantised while loading (none on the replace-after path), tagged and set
    up as `_bnb_layer` sets up its own; a layer in the skip list among them is a bug, not a choice."""
    import bitsandbytes as bnb

    skip = NEVER_QUANTIZED + tuple(cfg.skip_modules)
    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    done = [
        n
        for n, m in model.named_modules()
        if isinstance(m, kinds) and not hasattr(m, "leantune_source_dtype")
    ]
    wrong = [n for n in done if skipped(n, skip)]
    if wrong:
        raise RuntimeError(f"quant: transformers quantised {wrong[0]}, which the skip list keeps")
    for name in done:
        layer = model.get_submodule(name)
        layer.leantune_source_dtype = model.dtype
        layer.leantune_at_load = True
        layer.support_avx512bf16_for_cpu = False  # see _bnb_layer
    return done


def quantize(model, cfg: QuantConfig):
    backend = resolve_backend(cfg)
    skip = NEVER_QUANTIZED + tuple(cfg.skip_modules)
    at_load = _quantized_at_load(model, cfg) if backend == "bitsandbytes" else []
    names = quantizable_layers(model, skip)  # what is left: all of them on the replace-after path
    if not names and not at_load:
        raise UserError(
            f"quant: no linear layer left to quantise after skipping {', '.join(skip)}; "
            "shorten methods.N.skip_modules"
        )
    build = _bnb_layer if backend == "bitsandbytes" else _torch_layer
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        original = getattr(parent, child)
        source_dtype = original.weight.dtype
        layer = build(_as_linear(original), cfg)
        layer.leantune_source_dtype = source_dtype
        setattr(parent, child, layer)
    if backend == "bitsandbytes":
        # peft wraps bitsandbytes layers with its own LoRA layers only on models flagged like this.
        setattr(model, f"is_loaded_in_{cfg.bits}bit", True)
    return model


def quantized_layers(model) -> list:
    return [m for m in model.modules() if hasattr(m, "leantune_source_dtype")]


def layer_bytes(layer) -> int:
    """Bytes of a quantised layer's weight: codes plus every scale and codebook it needs."""
    import torch

    weight = layer.weight
    total = weight.numel() * weight.element_size()
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes 4-bit
        total += sum(v.numel() * v.element_size() for v in quant_state.as_dict(packed=True).values())
    elif hasattr(layer, "absmax"):  # ours
        total += layer.absmax.numel() * 4 + (layer.codebook.numel() * 4 if layer.codebook is not None else 0)
    else:  # bitsandbytes 8-bit: one fp32 scale per row, on the weight or (after a forward) on the state
        scale = getattr(weight, "SCB", None)
        scale = scale if scale is not None else layer.state.SCB
        total += scale.numel() * scale.element_size() if isinstance(scale, torch.Tensor) else 0
    return total


def report(model, cfg: QuantConfig) -> dict[str, Any]:
    from leantune.models.quantized import logical_numel

    layers = quantized_layers(model)
    before = sum(logical_numel(m.weight) * m.leantune_source_dtype.itemsize for m in layers)
    after = sum(layer_bytes(m) for m in layers)
    backend = "torch" if any(hasattr(m, "absmax") for m in layers) else "bitsandbytes"
    return {
        "bits": cfg.bits,
        "quant_type": cfg.quant_type if cfg.bits == 4 else "int8",
        "backend": backend,
        "quantized_layers": len(layers),
        "quantized_at_load": sum(getattr(m, "leantune_at_load", False) for m in layers),
        "quantized_weights": sum(logical_numel(m.weight) for m in layers),
        "weight_bytes_unquantized": before,
        "weight_bytes_quantized": after,
        "weight_bytes_saved": before - after,
        "bits_per_weight": 8.0 * after / max(sum(logical_numel(m.weight) for m in layers), 1),
    }


def plan_for(model, cfg: QuantConfig):
    """The memory planner's view of this method before it is applied: the frozen linear weights it would
    replace shrink to `bits` per weight plus block scales (trainable and LoRA weights are left alone)."""
    from leantune.memory.contribution import MemoryContribution
    from leantune.models.quantizable import frozen_linear_weights, packed_bytes_per_weight

    skip = NEVER_QUANTIZED + tuple(cfg.skip_modules) + ("lora_A", "lora_B")  # an adapter's own factors
    nbytes, numel = frozen_linear_weights(model, skip=skip)
    packed = int(numel * packed_bytes_per_weight(cfg.bits, cfg.blocksize, cfg.double_quant))
    kind = cfg.quant_type.upper() if cfg.bits == 4 else "int8"
    return MemoryContribution(
        weights=packed - nbytes if nbytes else 0,
        note=f"{cfg.bits}-bit {kind} base (add {{name: quant, bits: {cfg.bits}}} before the LoRA method)",
    )


SPEC = register(
    MethodSpec(
        "quant",
        QuantConfig,
        apply,
        report=report,
        reload=reload,
        plan_for=plan_for,
        load_options=load_options,
    )
)
