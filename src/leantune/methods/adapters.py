"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): small residual MLPs inside each block.

An adapter maps the output x of a sub-layer's output projection to x + up(act(down(x))), with down: h -> h/rf
and up: h/rf -> h. `up` starts at zero, so the wrapped model computes exactly what the base did until
training moves it. Houlsby puts one after the attention output projection and one after the FFN output
projection of each block; Pfeiffer only the FFN one. The base stays frozen; a classification head trains.

Each adapter is a submodule of its block (`adapter_attn`, `adapter_ffn`, so the optimizer, checkpoints and
the frozen-prefix cache see it) and runs as a forward hook on the block's *pretrained* projection (inside
peft's LoRA wrapper when LoRA targets the same projection, so LoRA's update adds after the adapter whatever
the order). AdapterHub's `adapters` library would pin an older transformers (shared/STACK.md), hence this
module. Adapters are nonlinear: they cannot be merged into the base weights. The run's model folder gets
`adapters.safetensors` (keys `<block>.<site>.<down|up>.<weight|bias>`) and `adapters.json`; `reload`
re-attaches them for `leantune eval`/`export`, and `attach_saved` does so for any folder holding them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from leantune.errors import UserError
from leantune.methods import _blocks
from leantune.methods.registry import MethodConfig, MethodContext, MethodSpec, extend_save, register

TENSORS, META = "adapters.safetensors", "adapters.json"
SITES = {"houlsby": ("attn", "ffn"), "pfeiffer": ("ffn",)}
# Output projections per site, as names relative to a block (BERT/MiniLM, Llama/SmolLM2, GPT-2, Falcon).
PROJECTIONS = {
    "attn": ("attention.output.dense", "self_attn.o_proj", "attn.c_proj", "self_attention.dense"),
    "ffn": ("output.dense", "mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h"),
}


class AdaptersConfig(MethodConfig):
    name: Literal["adapters"] = "adapters"
    type: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby", description="houlsby: after attention and after FFN; pfeiffer: after FFN only."
    )
    reduction_factor: int = Field(16, ge=1, description="Bottleneck width = hidden size // reduction_factor.")
    activation: Literal["relu", "gelu", "silu"] = "relu"
    layers: list[int] | None = Field(
        None, description="Blocks that get adapters; null: every block that still trains after freeze."
    )


def _adapter_class():
    import torch
    from torch import nn

    class BottleneckAdapter(nn.Module):
        """x + up(act(down(x))); up is zero at the start, so the adapter starts as the identity."""

        leantune_unmergeable = "bottleneck adapters are nonlinear modules, not a change of the base weights"

        def __init__(self, hidden: int, bottleneck: int, activation: str) -> None:
            super().__init__()
            self.activation = activation
            self.down = nn.Linear(hidden, bottleneck)
            self.up = nn.Linear(bottleneck, hidden)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            act = getattr(torch.nn.functional, self.activation)
            return x + self.up(act(self.down(x)))

    return BottleneckAdapter


def _projection(block, site: str):
    """The pretrained output projection of `site` in `block` (peft's wrapped base layer where LoRA sits)."""
    named = dict(block.named_modules())
    for rel in PROJECTIONS[site]:
        module = named.get(rel)
        if module is not None:
            return module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return None


def _out_features(layer) -> int:
    if hasattr(layer, "out_features"):
        return layer.out_features
    return layer.nf  # GPT-2's Conv1D


def bottleneck_width(hidden: int, reduction_factor: int) -> int:
    width = hidden // reduction_factor
    if width == 0:
        raise UserError(
            f"adapters: reduction_factor={reduction_factor} leaves no hidden unit (hidden size {hidden}); "
            f"set methods.N.reduction_factor to at most {hidden}"
        )
    return width


def check_order(ctx: MethodContext) -> None:
    _blocks.check_method_list(ctx.task, ctx.methods)


def attach(model, sites: tuple[str, ...], layers: list[int], width: int, activation: str) -> dict[str, Any]:
    """Insert adapters at `sites` of blocks `layers`; returns {"layers", "sites", "hidden", "bottleneck"}."""
    _, blocks = _blocks.blocks_of(model, "adapters")
    adapter_cls = _adapter_class()
    hidden = None
    for i in layers:
        block = blocks[i]
        for site in sites:
            proj = _projection(block, site)
            if proj is None:
                raise UserError(
                    f"adapters: {type(block).__name__} has no {site} output projection this method knows "
                    f"({', '.join(PROJECTIONS[site])}); use lora on this architecture"
                )
            hidden = _out_features(proj)
            weight = next(proj.parameters())
            dtype = getattr(proj, "leantune_source_dtype", None)  # a quantised base layer: its source dtype
            dtype = dtype or (weight.dtype if weight.is_floating_point() else None)
            adapter = adapter_cls(hidden, width, activation).to(device=weight.device, dtype=dtype)
            block.add_module(f"adapter_{site}", adapter)
            proj.register_forward_hook(lambda _m, _args, out, a=adapter: a(out))
    return {"layers": list(layers), "sites": list(sites), "hidden": hidden, "bottleneck": width}


def adapter_tensors(model, layers: list[int], sites: list[str]) -> dict[str, Any]:
    _, blocks = _blocks.blocks_of(model, "adapters")
    out = {}
    for i in layers:
        for site in sites:
            for key, value in getattr(blocks[i], f"adapter_{site}").state_dict().items():
                out[f"{i}.{site}.{key}"] = value.detach().contiguous()
    return out


def _write(model, folder: Path, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    save_file(adapter_tensors(model, meta["layers"], meta["sites"]), str(folder / TENSORS))
    (folder / META).write_text(json.dumps(meta, indent=2))


def _bind_save(model, meta: dict[str, Any]) -> None:
    is_peft = hasattr(model, "peft_config")

    def write(model, folder: Path) -> None:
        _write(model, folder, meta)

    def without_adapters(model) -> dict[str, Any]:  # the base's own file stays a plain HF checkpoint
        return {
            k: v
            for k, v in model.state_dict().items()
            if ".adapter_attn." not in k and ".adapter_ffn." not in k
        }

    # peft saves only its own weights anyway (and lora_sp passes its own state_dict): filter plain models only
    extend_save(model, write, state_dict=None if is_peft else without_adapters)


def apply(model, cfg: AdaptersConfig, ctx: MethodContext):
    check_order(ctx)
    _, blocks = _blocks.blocks_of(model, "adapters")
    layers = _blocks.target_blocks(model, "adapters", cfg.layers, len(blocks))
    first = _projection(blocks[layers[0]], "ffn")
    if first is None:
        raise UserError(
            f"adapters: {type(blocks[0]).__name__} has no FFN output projection this method knows "
            f"({', '.join(PROJECTIONS['ffn'])}); use lora on this architecture"
        )
    width = bottleneck_width(_out_features(first), cfg.reduction_factor)
    heads: list[str] = []
    if not hasattr(model, "peft_config"):  # under peft the base is frozen and the head in modules_to_save
        for p in model.parameters():
            p.requires_grad_(False)
        heads = _blocks.train_head(model, ctx.task)
    meta = attach(model, SITES[cfg.type], layers, width, cfg.activation)
    meta = {"type": cfg.type, "reduction_factor": cfg.reduction_factor, "activation": cfg.activation, **meta}
    meta["how"] = (
        "x -> x + up(act(down(x))) on the output of each site's output projection of each listed block "
        "(attn: attention output, ffn: FFN output); see leantune.methods.adapters"
    )
    object.__setattr__(model, "leantune_adapters", {**meta, "heads": heads})
    _bind_save(model, meta)
    return model


def attach_saved(model, folder: Path):
    """Re-attach the adapters saved in `folder` (a run's model folder or an export) to a loaded base."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / TENSORS).is_file() or not (folder / META).is_file():
        raise UserError(f"adapters: {folder} has no {TENSORS}/{META}; was it saved by an adapters run?")
    meta = json.loads((folder / META).read_text())
    attach(model, tuple(meta["sites"]), meta["layers"], meta["bottleneck"], meta["activation"])
    _, blocks = _blocks.blocks_of(model, "adapters")
    tensors = load_file(str(folder / TENSORS))
    for i in meta["layers"]:
        for site in meta["sites"]:
            prefix = f"{i}.{site}."
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            getattr(blocks[i], f"adapter_{site}").load_state_dict(state)
    object.__setattr__(model, "leantune_adapters", {**meta, "heads": []})
    _bind_save(model, meta)
    # a peft adapter loaded on top next (`[..., lora, adapters]` runs) saves through PeftModel, which
    # re-binds these writers (see recipes.common.load_trained_model)
    object.__setattr__(model, "leantune_save_extras", [lambda m, folder: _write(m, folder, meta)])
    return model


def reload(model, cfg: AdaptersConfig, run_dir: Path):
    return attach_saved(model, Path(run_dir) / "model")


def report(model, cfg: AdaptersConfig) -> dict[str, Any]:
    meta = getattr(model, "leantune_adapters", {})
    counts = _blocks.own_counts(model, "adapters")
    head = sum(
        p.numel() for n in meta.get("heads", []) for p in getattr(model, n).parameters() if p.requires_grad
    )
    return {
        "type": cfg.type,
        "reduction_factor": cfg.reduction_factor,
        "bottleneck": meta.get("bottleneck"),
        "layers": meta.get("layers"),
        **counts,
        "head_trained_by_adapters": head,
    }


SPEC = register(MethodSpec("adapters", AdaptersConfig, apply, report=report, reload=reload))
