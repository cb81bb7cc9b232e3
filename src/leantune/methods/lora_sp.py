"""LoRA-SP: LoRA whose A and B each train only a fixed, seeded half of their entries: dW = (A*S)(B*S)^T.

peft injects a plain LoRA (through `leantune.methods.lora`); then each lora_A/lora_B weight is
re-parametrised with `torch.nn.utils.parametrize`: the dense matrix becomes a frozen buffer, the selected
entries a trainable (1, k) Parameter plus an index buffer, and the layer's `weight` is rebuilt as
`index_put(frozen, index, values)` on every access. Autograd therefore only reaches the trainable entries,
and since only they are Parameters, AdamW keeps state for exactly them: the optimizer state halves with
the trainable count. Gradient-masking hooks would not do that, and weight decay would still move masked
entries.

What the masked entries hold is `frozen_entries`. `zero` (the default) is the paper's eq. 2,
dW = (A*S)(B*S)^T: masked entries of A and B are 0, so dW is exactly the product of the masked matrices.
`init` is what leantune did before: masked A entries keep peft's random init (masked B entries are 0 in
both, since peft starts B at 0), so dW = (A*S + A0*(1-S))(B*S)^T carries a random, untrained part of A.
Either way the masked entries never change, bit for bit.

The values are a (1, k) row rather than 1-D because the optimizer excludes 1-D tensors (biases, norms)
from weight decay; these are matrix entries and should decay like LoRA's A and B do.

Neither peft nor torch ships structured-sparse trainable subsets of a weight, hence this module. The mask
is reproducible from (mask_seed, tensor key) alone, see `mask_index`. Saving writes a plain peft LoRA (the
dense A and B) that `PeftModel.from_pretrained` loads, so eval, export and merge work unchanged, plus
`lora_sp.json` with the seed and density. The run saves through `model.save_pretrained`, so `apply` binds
a dense-saving `save_pretrained` to the returned model (the trainer never asks which method it is).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from leantune.errors import UserError, name_some
from leantune.methods import lora
from leantune.methods.registry import MethodContext, MethodRuntime, MethodSpec, extend_save, register

SIDECAR = "lora_sp.json"


class LoraSpConfig(lora.LoraConfig):
    name: Literal["lora_sp"] = "lora_sp"  # type: ignore[assignment]
    mask_seed: int | None = Field(None, ge=0, description="Seed of the masks; null: train.seed.")
    density: float = Field(0.5, gt=0, le=1, description="Share of the entries of each A and B that train.")
    frozen_entries: Literal["zero", "init"] = Field(
        "zero",
        description="What masked entries hold: zero (the paper, dW = (A*S)(B*S)^T) or peft's init "
        "(masked A entries keep their random init).",
    )


def matrix_seed(mask_seed: int, key: str) -> int:
    """Each matrix gets its own seed, so adding or removing targets never changes the other masks."""
    digest = hashlib.sha256(f"{mask_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def trainable_count(numel: int, density: float) -> int:
    return math.floor(density * numel)


def mask_index(mask_seed: int, key: str, numel: int, density: float):
    """Sorted flat indices of the trainable entries of the tensor saved under `key` in the adapter."""
    import torch

    generator = torch.Generator().manual_seed(matrix_seed(mask_seed, key))
    chosen = torch.randperm(numel, generator=generator)[: trainable_count(numel, density)]
    return chosen.sort().values


def _sparse_entries_class():
    import torch

    class SparseEntries(torch.nn.Module):
        """The parametrisation: frozen dense matrix in, same matrix with the trainable entries put back."""

        def __init__(self, dense: torch.Tensor, index: torch.Tensor, key: str, mask_seed: int) -> None:
            super().__init__()
            self.key, self.mask_seed, self.numel = key, mask_seed, dense.numel()
            self.register_buffer("index", index)
            self.values = torch.nn.Parameter(dense.reshape(-1)[index].clone().unsqueeze(0))

        def forward(self, frozen: torch.Tensor) -> torch.Tensor:
            flat = frozen.reshape(-1).index_put((self.index,), self.values[0].to(frozen.dtype))
            return flat.view(frozen.shape)

    return SparseEntries


def adapter_key(module_name: str, adapter: str) -> str:
    """`...query.lora_A.default` -> `...query.lora_A.weight`, the key peft writes to the adapter file."""
    return f"{module_name.removesuffix('.' + adapter)}.weight"


def sparse_layers(model) -> dict[str, Any]:
    """Module name -> re-parametrised lora_A/lora_B linear layer."""
    from torch.nn.utils import parametrize

    return {n: m for n, m in model.named_modules() if parametrize.is_parametrized(m, "weight")}


def _sparsify(model, mask_seed: int, density: float, frozen_entries: str) -> None:
    import torch
    from torch.nn.utils import parametrize

    sparse_entries = _sparse_entries_class()
    adapter = model.active_adapter
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if name.endswith((f"lora_A.{adapter}", f"lora_B.{adapter}")) and isinstance(module, torch.nn.Linear)
    ]
    for name, linear in targets:
        key = adapter_key(name, adapter)
        numel = linear.weight.numel()
        if trainable_count(numel, density) == 0:
            raise UserError(
                f"lora_sp: density={density} leaves no trainable entry of {key} ({numel} entries); "
                "raise methods.N.density or r"
            )
        init = linear.weight.detach().clone()
        frozen = init if frozen_entries == "init" else torch.zeros_like(init)
        del linear.weight  # a Parameter; it comes back as a frozen buffer
        linear.register_buffer("weight", frozen)
        index = mask_index(mask_seed, key, numel, density).to(init.device)
        # the trainable entries start at peft's init in both settings
        parametrize.register_parametrization(linear, "weight", sparse_entries(init, index, key, mask_seed))


def dense_state_dict(model) -> dict[str, Any]:
    """The model's state dict with every re-parametrised weight written back as one dense tensor."""
    state = model.state_dict()
    for name, module in sparse_layers(model).items():
        prefix = f"{name}.parametrizations."
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
        state[f"{name}.weight"] = module.weight.detach().clone()
    return state


def masks(model) -> list[Any]:
    """The `SparseEntries` of every re-parametrised matrix (key, mask_seed, numel, index, values)."""
    return [m.parametrizations.weight[0] for m in sparse_layers(model).values()]


def sidecar(model, density: float, frozen_entries: str) -> dict[str, Any]:
    entries = masks(model)
    return {
        "method": "lora_sp",
        "mask_seed": entries[0].mask_seed,
        "density": density,
        "frozen_entries": frozen_entries,
        "mask": "trainable flat indices of the tensor saved under `key`: the first floor(density*numel) of "
        "torch.randperm(numel, generator=torch.Generator().manual_seed(s)), s = the first 8 bytes "
        "(little-endian, & 2**63-1) of sha256(f'{mask_seed}:{key}'); see leantune.methods.lora_sp.mask_index",
        "trainable_entries": {e.key: e.index.numel() for e in entries},
        "entries": {e.key: e.numel for e in entries},
    }


def _bind_dense_save(model, density: float, frozen_entries: str) -> None:
    def write_sidecar(model, folder: Path) -> None:
        (folder / SIDECAR).write_text(json.dumps(sidecar(model, density, frozen_entries), indent=2))

    extend_save(model, write_sidecar, state_dict=dense_state_dict)


def resolved_seed(cfg: LoraSpConfig, ctx: MethodContext) -> int:
    return cfg.mask_seed if cfg.mask_seed is not None else ctx.seed


def apply(model, cfg: LoraSpConfig, ctx: MethodContext):
    plain = lora.LoraConfig(**cfg.model_dump(exclude={"name", "mask_seed", "density", "frozen_entries"}))
    model = lora.apply(model, plain, ctx)
    seed = resolved_seed(cfg, ctx)
    _sparsify(model, seed, cfg.density, cfg.frozen_entries)
    _bind_dense_save(model, cfg.density, cfg.frozen_entries)
    return model


class FrozenHalves(MethodRuntime):
    """Checkpoints the frozen dense matrices too, so a resume never depends on re-drawing peft's init.

    A checkpoint whose masked entries are not all zero was written with `frozen_entries: init` (the only
    behaviour before the option existed, so a config.yaml from then reads as the new default, zero):
    resuming it under `zero` would silently train a different product, so `load` refuses it."""

    def __init__(self, model, frozen_entries: str) -> None:
        self.layers = sparse_layers(model)
        self.frozen_entries = frozen_entries

    def tensors(self) -> dict[str, Any]:
        return {name: m.parametrizations.weight.original for name, m in self.layers.items()}

    def load(self, state: dict[str, Any], tensors: dict[str, Any]) -> None:
        import torch

        if self.frozen_entries == "zero":
            nonzero = [name for name in self.layers if tensors[name].any()]
            if nonzero:
                raise UserError(
                    f"lora_sp: the checkpoint's masked entries of {name_some(nonzero)} are not zero, so it "
                    "was written with frozen_entries=init (the behaviour before the option existed); "
                    "resume with methods.N.frozen_entries=init in config.yaml, or start a new run"
                )
        with torch.no_grad():
            for name, m in self.layers.items():
                m.parametrizations.weight.original.copy_(tensors[name])


def report(model, cfg: LoraSpConfig) -> dict[str, Any]:
    entries = masks(model)
    trainable = sum(e.index.numel() for e in entries)
    dense = sum(e.numel for e in entries)
    return {
        "mask_seed": entries[0].mask_seed,
        "density": cfg.density,
        "frozen_entries": cfg.frozen_entries,
        "matrices": len(entries),
        "trainable_entries": trainable,
        "dense_entries": dense,
        "achieved_density": trainable / max(dense, 1),
        "trainable_entries_per_matrix": {e.key: f"{e.index.numel()}/{e.numel}" for e in entries},
    }


SPEC = register(
    MethodSpec(
        "lora_sp",
        LoraSpConfig,
        apply,
        runtime=lambda model, cfg, ctx: FrozenHalves(model, cfg.frozen_entries),
        report=report,
    )
)
