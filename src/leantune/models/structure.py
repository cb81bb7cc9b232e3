"""Find the parts of an arbitrary HF model that methods address: its stack of blocks, its embeddings.

Architectures name these differently (`encoder.layer`, `h`, `model.layers`, `encoder.block`); looking
for the structure instead of the names keeps methods architecture-agnostic.
"""

from __future__ import annotations

import re

from torch import nn

_EMBEDDING_NAME = re.compile(r"(^|\.)(embeddings|embed_tokens|embed_positions|wte|wpe|shared)$")


def block_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every stack of same-typed blocks (an encoder-decoder has two), outermost only, in model order.

    A ModuleList inside a block (experts, sub-layers) is part of that block, not a stack of its own.
    """
    stacks: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(prefix + ".") for prefix, _ in stacks):
            continue
        if len({type(m) for m in module}) == 1 and any(True for _ in module[0].parameters()):
            stacks.append((name, module))
    return stacks


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The first-found longest stack of blocks (for encoder-decoders of equal depth, the encoder's)."""
    stacks = block_stacks(model)
    if not stacks:
        raise ValueError(f"{type(model).__name__} has no stack of transformer blocks")
    return max(stacks, key=lambda stack: len(stack[1]))  # max keeps the first of equal lengths


def embedding_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Input embeddings plus position/type embeddings, by structure and by conventional names."""
    found: dict[int, tuple[str, nn.Module]] = {}
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name, module in model.named_modules():
        if module is inputs or _EMBEDDING_NAME.search(name):
            found.setdefault(id(module), (name, module))
    return list(found.values())


def linear_module_names(model: nn.Module) -> list[str]:
    """Short names (last path component) of the layers LoRA can target."""
    from transformers.pytorch_utils import Conv1D

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    return sorted(names)
