"""LOMO (Lv et al. 2023, "Full Parameter Fine-tuning for Large Language Models with Limited Resources") and
AdaLomo (Lv et al. 2023, "AdaLomo: Low-memory Optimization with Adaptive Learning Rate"): the gradient of
each parameter is applied and freed inside backward, so the full set of gradients never exists at once.

How: `on_train_start` registers `register_post_accumulate_grad_hook` on every trainable parameter. The
runtime's `step` runs forward and backward; as soon as a parameter's gradient is complete (after every
use of the parameter, tied weights included) its hook updates the parameter in place and sets
`.grad = None`. At most one gradient is alive at a time; the trainer's clipping and AdamW then find no
gradient and do nothing (AdamW allocates no state for a parameter whose grad is None), and it logs
`grad_norm` 0.0 (the report holds LOMO's own norm).

- lomo: SGD, theta <- theta - lr * (g + wd * theta), lr and weight decay per group from the trainer's
  optimizer (`train.lr` through its schedule; `train.weight_decay` with the no-decay split).
- adalomo: the AdaLomo update: Adafactor's factored second moments (row and column means of g^2 for a
  matrix, the full vector for a 1-D parameter; beta2_t = 1 - t^decay_rate), u = g / sqrt(v), grouped
  update normalisation u / max(1, RMS(u) / clip_threshold), and a relative step
  lr * max(eps_scale, RMS(theta)). Its moments are fp32 state saved through `tensors()` for an exact
  resume; the step count t is the trainer's step + 1, so nothing else is saved.
- `train.max_grad_norm` (both): LOMO's two-pass clipping. A first backward (graph retained) only sums
  the squared gradient norms, freeing each gradient at once; the second applies the update with the
  gradients scaled by min(1, max_norm / (norm + 1e-6)), torch's `clip_grad_norm_` rule. It costs one
  more backward per step: set `train.max_grad_norm: null` to skip it (AdaLomo's update normalisation
  already bounds each step).

Why not `lomo-optim` 0.1.1 (read before deciding): its AdaLomo allocates its state with `.cuda()`
unconditionally (no CPU), both optimizers hook `Tensor.register_hook` and scan every parameter in every
hook call (quadratic in the number of tensors, each update lagging one hook behind plus a manual call
after backward), they expect their own `fused_backward(loss, lr)` driver instead of our loop's step, keep
AdaLomo's moments in name-keyed dicts outside any state_dict (no exact resume) and import transformers'
DeepSpeed integration. The update rules here follow its `fuse_update` arithmetic.

Refused (one line): `train.grad_accum > 1` (gradients are consumed per micro-batch, nothing accumulates),
an explicit `train.optimizer`, `adamw_impl` or Adam beta/epsilon (no AdamW runs), fp16 (loss scaling),
more than one process (the hooks would update before DDP's all-reduce), and a second method with its
own step.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field

from leantune.errors import UserError
from leantune.methods._own_step import OPTIMIZER_OPTIONS, check_train_options, refuse_other_steps
from leantune.methods.registry import MethodConfig, MethodContext, MethodRuntime, MethodSpec, register

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s


class LomoConfig(MethodConfig):
    name: Literal["lomo"] = "lomo"


class AdaLomoConfig(MethodConfig):
    name: Literal["adalomo"] = "adalomo"
    decay_rate: float = Field(-0.8, lt=0, description="beta2_t = 1 - t^decay_rate (Adafactor's -0.8).")
    eps_sq: float = Field(1e-30, gt=0, description="Added to g^2 before the second moments.")
    eps_scale: float = Field(1e-3, gt=0, description="Floor of RMS(theta) in the relative step size.")
    clip_threshold: float = Field(1.0, gt=0, description="Update normalisation: u / max(1, RMS(u) / d).")


def apply(model, cfg, ctx: MethodContext):
    refuse_other_steps(cfg.name, ctx.methods)
    return model  # trains whatever is trainable when it runs (all of it unless an earlier method froze)


def _rms(t) -> float:
    return float(t.norm(2)) / math.sqrt(t.numel())


class LomoRuntime(MethodRuntime):
    lr_auto_refusal = "lomo and adalomo apply their update inside backward, outside the optimizer"

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.names: dict[int, str] = {}  # id(param) -> name
        self.group_of: dict[int, int] = {}  # id(param) -> index of its optimizer group
        self.lr: list[float] = []
        self.wd: list[float] = []
        self.max_norm: float | None = None
        self.mode: str | None = None  # "norm" (first pass of clipping), "update", or None: hooks idle
        self.sq_norm = None
        self.coef = 1.0
        self.handles: list = []
        self.t = 0  # this step's number, 1-based (AdaLomo's beta2_t)
        self.steps = 0
        self.backward_passes = 0
        self.last_grad_norm: float | None = None
        self.clipped_steps = 0

    # -- hooks around the trainer's steps ----------------------------------------------------------
    def check_run(self, cfg, world: int) -> None:
        name, tc = self.cfg.name, cfg.train
        check_train_options(cfg, world, name, OPTIMIZER_OPTIONS)
        if tc.grad_accum > 1:
            raise UserError(
                f"{name} applies each gradient inside backward, so train.grad_accum={tc.grad_accum} cannot "
                "accumulate; set train.grad_accum=1 and raise train.batch_size instead"
            )

    def on_train_start(self, trainer) -> None:
        tc = trainer.cfg.train
        self.max_norm = tc.max_grad_norm
        groups = trainer.torch_optimizer.param_groups
        index = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
        for pname, p in trainer.module.named_parameters():
            if p.requires_grad and id(p) in index:
                self.names[id(p)] = pname
                self.group_of[id(p)] = index[id(p)]
                self.handles.append(p.register_post_accumulate_grad_hook(self._hook))

    def on_step_start(self, trainer) -> None:
        groups = trainer.torch_optimizer.param_groups
        self.lr = [g["lr"] for g in groups]
        self.wd = [g["weight_decay"] for g in groups]
        self.t = trainer.state.step + 1

    def on_step_end(self, trainer) -> None:
        self.steps += 1

    # -- the step: forward, (norm pass), update pass -----------------------------------------------
    def step(self, model, batch, accelerator, scale: float):
        import torch

        loss = model(**batch).loss
        try:
            self.coef = 1.0
            if self.max_norm is not None:
                self.mode, self.sq_norm = "norm", torch.zeros((), dtype=torch.float64)
                accelerator.backward(loss * scale, retain_graph=True)
                self.backward_passes += 1
                norm = float(self.sq_norm.sqrt())
                self.last_grad_norm = norm
                self.coef = min(1.0, self.max_norm / (norm + CLIP_EPS))
                self.clipped_steps += self.coef < 1.0
            self.mode = "update"
            accelerator.backward(loss * scale)
            self.backward_passes += 1
        finally:
            self.mode = None
        return loss.detach()

    def _hook(self, p) -> None:
        import torch

        if self.mode is None:  # a backward outside our step (none in the trainer): leave the grad alone
            return
        g, p.grad = p.grad, None
        with torch.no_grad():
            if self.mode == "norm":
                # a dot product allocates nothing the size of g (g.double().pow(2) allocated two
                # float64 copies of the largest gradient: the peak of the whole step on MiniLM)
                flat = g.reshape(-1) if g.dtype in (torch.float32, torch.float64) else g.reshape(-1).float()
                self.sq_norm += torch.dot(flat, flat).double().cpu()
                return
            i = self.group_of[id(p)]
            self.update(p, g if self.max_norm is None else g * self.coef, self.lr[i], self.wd[i])

    def update(self, p, g, lr: float, wd: float) -> None:
        """SGD with coupled weight decay, as torch.optim.SGD(weight_decay=wd) computes it."""
        if wd:
            g = g.add(p, alpha=wd)
        p.add_(g.to(p.dtype), alpha=-lr)

    def report(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "backward_passes": self.backward_passes,
            "two_pass_clipping": self.max_norm is not None,
            "last_grad_norm": self.last_grad_norm,
            "clipped_steps": self.clipped_steps,
            "hooked_params": len(self.handles),
        }


class AdaLomoRuntime(LomoRuntime):
    def __init__(self, cfg: AdaLomoConfig) -> None:
        super().__init__(cfg)
        self.moments: dict[str, Any] = {}  # "<param>.row" / ".col" (matrices) or ".v" (vectors), fp32
        self.pending: dict[str, Any] = {}  # loaded from a checkpoint before training starts

    def update(self, p, g, lr: float, wd: float) -> None:
        import torch

        cfg, name = self.cfg, self.names[id(p)]
        beta = 1.0 - math.pow(self.t, cfg.decay_rate)
        g = g.float()
        sq = g.pow(2).add_(cfg.eps_sq)
        if p.ndim >= 2:
            row = self._moment(f"{name}.row", sq.shape[:-1], p.device)
            col = self._moment(f"{name}.col", sq.shape[:-2] + sq.shape[-1:], p.device)
            row.mul_(beta).add_(sq.mean(dim=-1), alpha=1.0 - beta)
            col.mul_(beta).add_(sq.mean(dim=-2), alpha=1.0 - beta)
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            u = torch.mul(r_factor, col.unsqueeze(-2).rsqrt()).mul_(g)
        else:
            v = self._moment(f"{name}.v", sq.shape, p.device)
            v.mul_(beta).add_(sq, alpha=1.0 - beta)
            u = v.rsqrt().mul_(g)
        u.div_(max(1.0, _rms(u) / cfg.clip_threshold))
        theta = p.float()
        alpha = lr * max(cfg.eps_scale, _rms(theta))
        if wd:
            theta.mul_(1.0 - alpha * wd)
        theta.add_(u, alpha=-alpha)
        p.copy_(theta)

    def _moment(self, key: str, shape, device):
        import torch

        m = self.moments.get(key)
        if m is None:
            m = self.pending.pop(key, None)
            m = torch.zeros(shape, dtype=torch.float32, device=device) if m is None else m.to(device)
            self.moments[key] = m
        return m

    def tensors(self) -> dict[str, Any]:
        return {k: v.detach().contiguous() for k, v in self.moments.items()}

    def load(self, state: dict[str, Any], tensors: dict[str, Any]) -> None:
        self.moments, self.pending = {}, dict(tensors)

    def report(self) -> dict[str, Any]:
        state = sum(m.numel() * m.element_size() for m in self.moments.values())
        return {**super().report(), "state_bytes": state}


def lomo_runtime(model, cfg: LomoConfig, ctx: MethodContext) -> LomoRuntime:
    return LomoRuntime(cfg)


def adalomo_runtime(model, cfg: AdaLomoConfig, ctx: MethodContext) -> AdaLomoRuntime:
    return AdaLomoRuntime(cfg)


def plan_for(model, cfg):
    """For the memory model: a fused backward (one gradient alive at a time: the largest tensor's), no
    AdamW state; AdaLomo adds its factored fp32 moments and its update's fp32 temporaries (g^2, the
    update u, and fp32 copies of g and theta for a non-fp32 model) for the largest tensor."""
    from leantune.memory.contribution import MemoryContribution
    from leantune.methods._own_step import adamw_bytes, trainable_tensors

    params = trainable_tensors(model)
    grads, state = adamw_bytes(params)
    big = max(params, key=lambda p: p.numel(), default=None)
    largest = big.numel() * big.element_size() if big is not None else 0
    numel = big.numel() if big is not None else 0
    transient = 0  # the SGD update is in place, the norm pass a dot product
    moments = 0
    if cfg.name == "adalomo":
        moments = sum(4 * _moment_numel(p.shape) for p in params)
        copies = 2 if big is not None and big.element_size() != 4 else 0
        transient = 4 * numel * (2 + copies)
    return MemoryContribution(
        gradients=largest - grads,
        optimizer_state=moments - state,
        step="fused_backward",
        transient=transient,
        note=f"{cfg.name}: each gradient applied and freed inside backward"
        + ("; factored fp32 second moments" if cfg.name == "adalomo" else "; no optimizer state"),
    )


def _moment_numel(shape) -> int:
    """AdaLomo's state for one tensor: row and column means for a matrix, the full vector for 1-D."""
    if len(shape) >= 2:
        rows = math.prod(shape[:-1])
        cols = math.prod(shape[:-2]) * shape[-1]
        return rows + cols
    return math.prod(shape)


SPEC = register(MethodSpec("lomo", LomoConfig, apply, runtime=lomo_runtime, plan_for=plan_for))
ADALOMO_SPEC = register(
    MethodSpec("adalomo", AdaLomoConfig, apply, runtime=adalomo_runtime, plan_for=plan_for)
)
