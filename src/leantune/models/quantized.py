"""Block-wise quantised frozen linear layers in pure PyTorch, and counting what packed weights hold.

Why our own: bitsandbytes is the reference (and what `quant` uses when it is installed), but it is an
optional, platform-dependent binary; users without it still get a frozen NF4/FP4/int8 base this way,
and tests use it to cross-check bitsandbytes' numbers. The scheme is bitsandbytes' own (QLoRA,
Dettmers et al. 2023): the weight is cut into blocks of `blocksize` consecutive values, each block is
scaled by its absolute maximum, and every scaled value is replaced by the nearest entry of a
16-value codebook (two 4-bit codes per byte) or rounded to int8 (one per byte). The statistics are
not double-quantised here (bitsandbytes' `compress_statistics`); the report counts the bytes exactly.

The forward dequantises the weight on the fly and the backward dequantises it again instead of keeping
it, so a quantised layer never holds its full-precision weight between forward and backward.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# bitsandbytes.functional.get_4bit_type: NF4 are the quantiles of N(0, 1) (equal probability mass per
# code); bitsandbytes' FP4 is 1 sign, 2 exponent (bias 2), 1 mantissa bit, in bit-pattern order.
NF4_CODEBOOK = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
_FP4 = (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
FP4_CODEBOOK = tuple(v / 12.0 for v in _FP4)
CODEBOOKS = {"nf4": NF4_CODEBOOK, "fp4": FP4_CODEBOOK}


def logical_numel(p: torch.Tensor) -> int:
    """How many weights a parameter stands for: a packed 4-bit tensor holds two per element."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)  # bitsandbytes Params4bit
    shape = shape if shape is not None else getattr(p, "logical_shape", None)  # ours
    return math.prod(shape) if shape is not None else p.numel()


def _blocks(weight: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = weight.detach().float().reshape(-1)
    flat = nn.functional.pad(flat, (0, -flat.numel() % blocksize))
    blocks = flat.view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    return blocks / absmax[:, None], absmax


def quantize_blockwise(
    weight: torch.Tensor, bits: int, blocksize: int, codebook: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax): 4-bit codes packed two per uint8, or int8 codes; one fp32 scale per block."""
    scaled, absmax = _blocks(weight, blocksize)
    if bits == 8:
        return torch.round(scaled * 127).to(torch.int8).reshape(-1), absmax
    order = torch.argsort(codebook)
    ascending = codebook[order]
    nearest = torch.bucketize(scaled.reshape(-1), (ascending[1:] + ascending[:-1]) / 2)
    codes = order[nearest].to(torch.uint8)
    codes = nn.functional.pad(codes, (0, codes.numel() % 2))
    return (codes[0::2] << 4) | codes[1::2], absmax


def dequantize_blockwise(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...],
    bits: int,
    blocksize: int,
    codebook: torch.Tensor | None,
) -> torch.Tensor:
    if bits == 8:
        values = codes.float() / 127
    else:
        values = codebook[torch.stack((codes >> 4, codes & 15), dim=1).reshape(-1).long()]
    n_blocks = absmax.numel()
    values = values[: n_blocks * blocksize].view(n_blocks, blocksize) * absmax[:, None]
    return values.reshape(-1)[: math.prod(shape)].view(shape)


class _DequantizedMatmul(torch.autograd.Function):
    """x @ W^T with W rebuilt from its codes in forward and again in backward (W itself is frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: BlockwiseQuantLinear) -> torch.Tensor:
        ctx.layer = layer
        return x @ layer.dequantized_weight().to(x.dtype).t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dequantized_weight().to(grad.dtype), None


class BlockwiseQuantLinear(nn.Linear):
    """A frozen nn.Linear whose weight is stored as block-wise codes (`weight`) and scales (`absmax`).

    It stays an nn.Linear so that adapters (peft LoRA) wrap it like any linear layer; `weight` is the
    frozen packed code tensor, tagged with the logical shape so parameter counts stay in weights.
    """

    def __init__(self, linear: nn.Linear, bits: int, quant_type: str, blocksize: int) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.quant_type, self.blocksize = bits, quant_type, blocksize
        weight = linear.weight
        codebook = torch.tensor(CODEBOOKS[quant_type]) if bits == 4 else None
        codes, absmax = quantize_blockwise(weight, bits, blocksize, codebook)
        self.weight = nn.Parameter(codes.to(weight.device), requires_grad=False)
        self.weight.logical_shape = tuple(weight.shape)
        self.register_buffer("absmax", absmax.to(weight.device))
        self.register_buffer("codebook", codebook.to(weight.device) if codebook is not None else None)
        self.compute_dtype = weight.dtype
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_blockwise(
            self.weight, self.absmax, self.weight.logical_shape, self.bits, self.blocksize, self.codebook
        ).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _DequantizedMatmul.apply(x, self)
        return out + self.bias.to(out.dtype) if self.bias is not None else out

    def extra_repr(self) -> str:
        kind = self.quant_type if self.bits == 4 else "int8"
        return f"in={self.in_features}, out={self.out_features}, {kind}, blocksize={self.blocksize}"
