"""The pieces of `grad_approx` no library has: the shared synthetic-gradient network G, the capture of
adaptation-site activations, and forming lightweight-parameter gradients from an estimated site gradient.

Why our own: synthetic gradients (Jaderberg et al. 2017, "Decoupled Neural Interfaces") have no
maintained implementation for HF/peft models; what we need is small (an MLP and a few forward hooks),
and forming LoRA gradients from dL/d(site output) is two einsums.

A *site* is a place where lightweight parameters enter the frozen network: a peft LoRA layer (output
o = W x + s B A drop(x)) or the prompt shift at the split point (o = H + P_proj at the first m
positions). G predicts delta_hat ~ dL/do per token from signals that are exact and cheap on a forward-only
step: the site input, the exact gradient at the head's input (backprop through the head alone), the
output error softmax(z) - onehot(y), whether the token is the first one, and a learned site embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SITE_EMBED_DIM = 8


class SyntheticGradientNet(nn.Module):
    """G: (site input x_t, per-example signals, site id, first-token flag) -> delta_hat_t.

    The first layer is a sum of separate maps so the per-example and per-site parts are computed once
    and broadcast over tokens instead of being concatenated to every token (cheaper by ~2x at MiniLM size).
    The output is multiplied by the per-example norm of the head-input gradient (a site gradient scales
    with how wrong the example is) and by a learned per-site scale, set from the first calibration batch
    (`match_scale`): site gradients are orders of magnitude smaller than G's raw output, and starting
    there would let the MSE term swamp the cosine term for hundreds of updates.
    """

    def __init__(
        self, d_in: int, d_out: int, d_top: int, num_labels: int, num_sites: int, depth: int, hidden: int
    ) -> None:
        super().__init__()
        width = d_out if depth == 1 else hidden
        self.site_embed = nn.Embedding(num_sites, SITE_EMBED_DIM)
        self.from_x = nn.Linear(d_in, width)
        self.from_example = nn.Linear(d_top + num_labels, width, bias=False)
        self.from_site = nn.Linear(SITE_EMBED_DIM + 1, width, bias=False)
        layers: list[nn.Module] = []
        for i in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(hidden, d_out if i == depth - 2 else hidden)]
        self.rest = nn.Sequential(*layers)
        self.log_scale = nn.Parameter(torch.zeros(num_sites))
        self.register_buffer("scale_set", torch.zeros(num_sites, dtype=torch.bool))

    @torch.no_grad()
    def match_scale(self, site: int, pred: torch.Tensor, true: torch.Tensor) -> None:
        """Once per site: shift its log-scale so the prediction has the target's norm."""
        if not self.scale_set[site] and pred.norm() > 0 and true.norm() > 0:
            self.log_scale[site] += torch.log(true.norm() / pred.norm())
            self.scale_set[site] = True

    def forward(
        self, x: torch.Tensor, top_grad: torch.Tensor, error: torch.Tensor, site: int, mask: torch.Tensor
    ) -> torch.Tensor:
        """x [B,T,d_in]; top_grad [B,d_top] (per-example, i.e. times batch size); error [B,C]; mask [B,T]."""
        norm = top_grad.norm(dim=-1, keepdim=True)
        example = self.from_example(torch.cat([top_grad / (norm + 1e-12), error], dim=-1))  # [B,w]
        site_vec = self.site_embed.weight[site]
        first = torch.zeros(x.shape[1], 1, dtype=x.dtype, device=x.device)
        first[0] = 1.0
        per_pos = self.from_site(torch.cat([site_vec.expand(x.shape[1], -1), first], dim=-1))  # [T,w]
        h = self.from_x(F.layer_norm(x, x.shape[-1:])) + example[:, None, :] + per_pos[None]
        out = self.rest(h)
        return out * (norm[:, :, None] * self.log_scale[site].exp()) * mask[:, :, None]


def lora_grads(
    delta: torch.Tensor, x: torch.Tensor, u: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """dL/dA, dL/dB of o = W x + s B (A x) given delta = dL/do, x = drop(input) and u = A x.

    dB = s sum_t delta_t u_t^T, dA = s sum_t (B^T delta_t) x_t^T: exactly what autograd computes when
    delta is the true site gradient, so the estimate differs from backprop only through delta.
    """
    d2, x2, u2 = delta.reshape(-1, delta.shape[-1]), x.reshape(-1, x.shape[-1]), u.reshape(-1, u.shape[-1])
    grad_b = scaling * d2.T @ u2
    grad_a = scaling * (d2 @ lora_b).T @ x2
    return grad_a, grad_b


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0, eps=1e-30))


def approximator_loss(pred: torch.Tensor, true: torch.Tensor, mse_weight: float) -> torch.Tensor:
    """1 - cosine (direction) + scaled MSE (magnitude, relative to the target's own energy)."""
    cos = F.cosine_similarity(pred.flatten(), true.flatten(), dim=0, eps=1e-30)
    mse = (pred - true).pow(2).sum() / true.pow(2).sum().clamp_min(1e-30)
    return (1 - cos) + mse_weight * mse


class PromptShift(nn.Module):
    """H' = H + Projection(P) at the first `m` positions of the hidden states entering block `split`.

    Our reading of the paper's H' = LayerNorm(H) + Projection(dtheta'): BERT-style blocks already emit
    layer-normed states, so LayerNorm(H) = H up to its affine parameters and is left out. P (m x k) is the
    trainable part; the projection (k -> hidden) is fixed, random and seeded, so dL/dP = Proj^T delta.
    """

    def __init__(self, num_tokens: int, dim: int, hidden: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.prompt = nn.Parameter(torch.zeros(num_tokens, dim))
        proj = torch.randn(hidden, dim, generator=gen) / math.sqrt(dim)
        self.register_buffer("projection", proj, persistent=True)

    def shift(self) -> torch.Tensor:
        return self.prompt @ self.projection.T  # [m, hidden]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        m = min(self.prompt.shape[0], hidden.shape[1])
        pad = hidden.new_zeros(hidden.shape[1] - m, hidden.shape[2])
        return hidden + torch.cat([self.shift()[:m], pad], dim=0)[None]


class SiteCapture:
    """Forward (and, when `grads`, backward) hooks that record what G and the gradient formulas need.

    Per site: `inputs` (the site's input, G's feature), `lora_x`/`lora_u` (dropped input and A x, for the
    LoRA gradient formulas), `deltas` (true dL/d(site output), on exact steps); `head_input` and `top_grad`
    (dL/d(head input)). The prompt site keeps only the first m positions, the only ones it changes.
    Everything is kept in the head's weight dtype: under mixed precision the model's forward runs in bf16
    (accelerate's autocast wraps only `model.forward`), while G, the head call of an approx step and the
    gradient formulas run outside it, beside fp32 weights that take fp32 gradients.
    """

    def __init__(self, sites: list[nn.Module], head: nn.Module, target: str, grads: bool) -> None:
        self.sites, self.head, self.target, self.grads = sites, head, target, grads
        self.dtype = next(head.parameters()).dtype
        n = len(sites)
        self.inputs: list = [None] * n
        self.lora_x: list = [None] * n
        self.lora_u: list = [None] * n
        self.deltas: list = [None] * n
        self.head_input = None
        self.top_grad = None
        self._handles: list = []

    def _site_hook(self, i: int):
        def hook(module, args, output):
            m = module.prompt.shape[0] if self.target == "prompt" else output.shape[1]
            self.inputs[i] = args[0][:, :m].detach().to(self.dtype)
            if self.grads and output.requires_grad:
                output.register_hook(lambda g: self.deltas.__setitem__(i, g[:, :m].detach().to(self.dtype)))

        return hook

    def _lora_a_hook(self, i: int):
        def hook(module, args, output):
            self.lora_x[i], self.lora_u[i] = args[0].detach().to(self.dtype), output.detach().to(self.dtype)

        return hook

    def _head_hook(self, module, args):
        self.head_input = args[0]  # the approx step re-runs the head on a detached copy, cast there
        if self.grads and args[0].requires_grad:
            args[0].register_hook(lambda g: setattr(self, "top_grad", g.detach().to(self.dtype)))

    def __enter__(self) -> SiteCapture:
        self._handles.append(self.head.register_forward_pre_hook(self._head_hook))
        for i, site in enumerate(self.sites):
            self._handles.append(site.register_forward_hook(self._site_hook(i)))
            if self.target == "lora":
                self._handles.append(site.lora_A["default"].register_forward_hook(self._lora_a_hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
