"""MeZO (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes"): zeroth-order SPSA.

Each optimizer step, for each of `n_spsa` samples k, with z_k ~ N(0, I) over the trainable parameters:

    theta += eps * z_k;  L+ = L(theta)          (forward only)
    theta -= 2 eps * z_k; L- = L(theta)
    theta += eps * z_k                          (restored, up to float rounding)
    g_k = (L+ - L-) / (2 eps)                   (the projected gradient, one number)

then theta <- theta - lr * (wd * theta + mean_k g_k z_k). Everything happens in place under
`torch.no_grad()`: z_k is never stored but regenerated from its seed with a `torch.Generator` each time it
is needed (four times per sample), in chunks of at most `CHUNK` elements, so the transient memory is one
chunk, not a copy of the weights; no `.grad` tensor is ever allocated, and the trainer's AdamW (which
skips parameters whose grad is None) never allocates state: training memory is inference memory.

How it maps onto the trainer without changing it:
- which parameters: every trainable one, read from the trainer's optimizer groups at each step start
  (so `methods: [mezo]` tunes everything, `[lora, mezo]` tunes LoRA only, and `[lisa, mezo]` follows
  LISA's per-step set); lr and weight decay per group are the trainer's: `train.lr` through its warmup /
  linear-decay schedule, and `train.weight_decay` with the usual no-decay split (biases, norms);
- the runtime's `step` runs the two forward passes of each micro-batch and accumulates
  `scale * g_k` (the same z_k for every micro-batch of a step, so `train.grad_accum` averages the
  two-point estimates of one direction over a larger batch); the update is applied in `on_step_end`,
  after the trainer's (empty) optimizer step; the trainer's clipping and AdamW see no gradient and do
  nothing, and it logs `grad_norm` 0.0 (the report holds the projected gradients instead);
- the seed of z_k is a pure function of (train.seed, step, k): `--resume` is exact with nothing to save.

Dropout would give L+ and L- different masks, which swamps the difference eps makes: the two forward
passes run with the model in eval mode (as the MeZO reference code's `zo_forward` does), so dropout of any
kind (nn.Dropout, attention dropout, LoRA dropout) is off for mezo; the report counts the dropout modules
this silences. Single process only (the projected gradients are not all-reduced); fp16 (loss scaling) is
refused; `train.max_grad_norm` and the optimizer options (`train.optimizer`, `adamw_impl`, the Adam
betas and epsilon) set explicitly are refused because nothing here uses them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from leantune.methods._own_step import OPTIMIZER_OPTIONS, check_train_options, refuse_other_steps
from leantune.methods.registry import MethodConfig, MethodContext, MethodRuntime, MethodSpec, register

CHUNK = 1 << 18  # elements of z generated at a time (1 MiB in fp32): the only transient buffer


class MezoConfig(MethodConfig):
    name: Literal["mezo"] = "mezo"
    eps: float = Field(1e-3, gt=0, description="Perturbation scale epsilon (the paper's 1e-3).")
    n_spsa: int = Field(1, ge=1, description="SPSA samples per step; their updates are averaged.")


def step_seed(seed: int, step: int, sample: int) -> int:
    """The seed of z for (train seed, optimizer step, sample): nothing to save for an exact resume."""
    import numpy as np

    entropy = [seed & 0xFFFFFFFFFFFFFFFF, step, sample]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


def perturb(params, seed: int, alpha) -> None:
    """theta += alpha * z in place, z ~ N(0, I) regenerated from `seed` in the same order every time.

    `alpha` is one number or one per parameter: the update must walk the very z the two forward passes
    measured, one stream over all parameters, even where groups differ in learning rate."""
    import torch

    alphas = list(alpha) if isinstance(alpha, (list, tuple)) else [alpha] * len(params)
    generators: dict = {}
    for p, a in zip(params, alphas, strict=True):
        g = generators.get(p.device)
        if g is None:
            g = generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        data = p.data
        pieces = data.view(-1).split(CHUNK) if data.is_contiguous() else (data,)
        for piece in pieces:
            z = torch.randn(piece.shape, generator=g, device=piece.device, dtype=piece.dtype)
            piece.add_(z, alpha=a)


def apply(model, cfg: MezoConfig, ctx: MethodContext):
    refuse_other_steps("mezo", ctx.methods)
    return model  # trains whatever is trainable when it runs


class MezoRuntime(MethodRuntime):
    lr_auto_refusal = "mezo applies its own zeroth-order update, outside the optimizer"

    def __init__(self, cfg: MezoConfig, seed: int) -> None:
        self.cfg, self.seed = cfg, seed
        self.groups: list[tuple[list, float, float]] = []  # (params, lr, weight decay) of this step
        self.seeds: list[int] = []
        self.projected: list[float] = []
        self.dropout_modules = 0
        self.steps = 0
        self.forward_passes = 0
        self.last_projected: list[float] = []
        self.abs_projected_sum = 0.0

    def check_run(self, cfg, world: int) -> None:
        check_train_options(cfg, world, "mezo", {"max_grad_norm": None, **OPTIMIZER_OPTIONS})

    def on_train_start(self, trainer) -> None:
        import torch

        self.dropout_modules = sum(
            isinstance(m, torch.nn.Dropout) and m.p > 0 for m in trainer.module.modules()
        )

    def on_step_start(self, trainer) -> None:
        step = trainer.state.step
        self.groups = []
        for group in trainer.torch_optimizer.param_groups:
            params = [p for p in group["params"] if p.requires_grad]
            if params:
                self.groups.append((params, group["lr"], group["weight_decay"]))
        self.seeds = [step_seed(self.seed, step, k) for k in range(self.cfg.n_spsa)]
        self.projected = [0.0] * self.cfg.n_spsa

    def _params(self) -> list:
        return [p for params, _, _ in self.groups for p in params]

    def step(self, model, batch, accelerator, scale: float):
        import torch

        params, eps = self._params(), self.cfg.eps
        modes = [(m, m.training) for m in model.modules()]
        model.eval()  # dropout off: both passes must see the same function
        losses = []
        try:
            with torch.no_grad():
                for k, seed in enumerate(self.seeds):
                    perturb(params, seed, eps)
                    plus = model(**batch).loss.detach().float()
                    perturb(params, seed, -2 * eps)
                    minus = model(**batch).loss.detach().float()
                    perturb(params, seed, eps)
                    self.projected[k] += scale * float(plus - minus) / (2 * eps)
                    losses.append((plus + minus) / 2)
                    self.forward_passes += 2
        finally:
            for m, training in modes:
                m.training = training
        return torch.stack(losses).mean()

    def on_step_end(self, trainer) -> None:
        import torch

        n = self.cfg.n_spsa
        with torch.no_grad():
            for params, lr, wd in self.groups:
                if wd:
                    for p in params:
                        p.data.mul_(1 - lr * wd)
            rates = [lr for params, lr, _ in self.groups for _ in params]  # in `_params()` order
            for seed, g in zip(self.seeds, self.projected, strict=True):
                perturb(self._params(), seed, [-lr * g / n for lr in rates])
        self.steps += 1
        self.last_projected = list(self.projected)
        self.abs_projected_sum += sum(abs(g) for g in self.projected) / n

    def report(self) -> dict[str, Any]:
        return {
            "eps": self.cfg.eps,
            "n_spsa": self.cfg.n_spsa,
            "steps": self.steps,
            "forward_passes": self.forward_passes,
            "dropout_modules_disabled": self.dropout_modules,
            "mean_abs_projected_grad": self.abs_projected_sum / max(self.steps, 1),
            "last_projected_grads": self.last_projected,
            "lr": "train.lr through the trainer's schedule",
        }


def runtime(model, cfg: MezoConfig, ctx: MethodContext) -> MezoRuntime:
    return MezoRuntime(cfg, ctx.seed)


def plan_for(model, cfg: MezoConfig):
    """For the memory model: no gradient, no optimizer state, no backward (a forward-only step), and the
    chunks of z on top of the forward pass."""
    from leantune.memory.contribution import MemoryContribution
    from leantune.methods._own_step import adamw_bytes, trainable_tensors

    params = trainable_tensors(model)
    grads, state = adamw_bytes(params)
    # two chunks: the next z is drawn before the previous one is released
    chunk = 2 * CHUNK * max((p.element_size() for p in params), default=4)
    return MemoryContribution(
        gradients=-grads,
        optimizer_state=-state,
        step="forward_only",
        transient=chunk,
        note="mezo: two no-grad forward passes; z regenerated in chunks, no gradient or optimizer state",
    )


SPEC = register(MethodSpec("mezo", MezoConfig, apply, runtime=runtime, plan_for=plan_for))
