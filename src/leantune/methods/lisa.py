"""LISA (Pan et al. 2024, "Layerwise Importance Sampled AdamW"): full-parameter training of a few blocks.

Embeddings and the head (every parameter outside the stack of blocks) always train; of the blocks only
`gamma` random ones train at a time, re-sampled every `interval` (K) steps. Gradients and AdamW state then
exist only for the active part, so memory is close to LoRA's while every weight can change.

How it maps onto a plain AdamW without rebuilding it (nothing in a library does this on our loop):
- `apply` marks every parameter trainable, so the trainer's one AdamW holds all of them;
- before each step the runtime narrows `requires_grad` to the always-trained part plus the sampled
  blocks. Inactive parameters then get no `.grad` (the trainer zeroes with `set_to_none`), and
  torch's AdamW skips a parameter whose grad is None entirely: no update, no weight decay, no state.
  On a re-sample the AdamW state of blocks that went inactive is dropped (`optimizer.state.pop`), so
  optimizer memory stays at the active share; a block drawn again later starts with fresh moments, and
  one drawn in two consecutive periods keeps its moments.
- after each step every parameter is marked trainable again, so what the trainer saves between steps
  (checkpoints, the best weights, the final model, the weight digest) covers every tensor LISA trained.
- the sample of period p = step // K is a pure function of (train seed, p): `--resume` is exact with
  nothing to save.
Single process only: DDP fixes the set of gradient-carrying parameters when it wraps the model, so a
world size above 1 is refused.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field

from leantune.errors import UserError
from leantune.methods.registry import MethodConfig, MethodContext, MethodRuntime, MethodSpec, register

HISTORY_SHOWN = 100  # periods listed in the report; beyond that only the per-block counts


class LisaConfig(MethodConfig):
    name: Literal["lisa"] = "lisa"
    gamma: int = Field(2, gt=0, description="Blocks trained at a time.")
    interval: int = Field(20, gt=0, description="Steps between re-samples (K).")
    train_embeddings: bool = Field(True, description="Always train the embeddings.")
    train_head: bool = Field(True, description="Always train everything outside the blocks and embeddings.")


def block_stacks(model) -> list[tuple[str, Any]]:
    """Every stack of blocks LISA samples from (both stacks of an encoder-decoder)."""
    from leantune.models.structure import block_stacks as stacks_of

    stacks = stacks_of(model)
    if not stacks:
        raise UserError(f"lisa: {type(model).__name__} has no stack of transformer blocks to sample from")
    return stacks


class LayerGroups:
    """The model's parameters as LISA sees them: one list per block, and the always-trained rest."""

    def __init__(self, model, cfg: LisaConfig) -> None:
        from leantune.models.structure import embedding_modules

        self.blocks = [list(block.parameters()) for _, stack in block_stacks(model) for block in stack]
        in_blocks = {id(p) for params in self.blocks for p in params}
        emb = {id(p) for _, m in embedding_modules(model) for p in m.parameters()} - in_blocks
        self.always, self.never = [], []
        for p in model.parameters():
            if id(p) in in_blocks:
                continue
            wanted = cfg.train_embeddings if id(p) in emb else cfg.train_head
            (self.always if wanted else self.never).append(p)
        self.block_sizes = [sum(p.numel() for p in params) for params in self.blocks]
        self.always_size = sum(p.numel() for p in self.always)
        self.total = sum(p.numel() for p in model.parameters())


def sample_blocks(seed: int, period: int, n_blocks: int, gamma: int) -> tuple[int, ...]:
    """The blocks active in `period`: a pure function of (seed, period), so a resumed run re-draws them."""
    import numpy as np

    rng = np.random.default_rng([seed, period])
    return tuple(sorted(int(i) for i in rng.choice(n_blocks, size=gamma, replace=False)))


def _check_single_process() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(
            "lisa runs in a single process only (DDP cannot follow its changing set of trained layers); "
            "launch without torchrun/accelerate multi-process"
        )


def apply(model, cfg: LisaConfig, ctx: MethodContext):
    _check_single_process()
    n_blocks = sum(len(stack) for _, stack in block_stacks(model))
    if cfg.gamma > n_blocks:
        raise UserError(
            f"lisa: gamma={cfg.gamma} but the model has {n_blocks} blocks; set methods.N.gamma <= {n_blocks}"
        )
    groups = LayerGroups(model, cfg)
    for p in model.parameters():
        p.requires_grad_(True)
    for p in groups.never:
        p.requires_grad_(False)
    return model


class LisaRuntime(MethodRuntime):
    lr_auto_refusal = "lisa samples its active layers per period in its step hooks"

    def __init__(self, cfg: LisaConfig, seed: int) -> None:
        self.cfg, self.seed = cfg, seed
        self.groups: LayerGroups | None = None
        self.active: tuple[int, ...] = ()
        self.period: int | None = None
        self.last_step = -1  # the last optimizer step this run (or the one it resumed) completed

    def _activate(self, trainer, period: int) -> None:
        g = self.groups
        self.period = period
        self.active = sample_blocks(self.seed, period, len(g.blocks), self.cfg.gamma)
        state = trainer.torch_optimizer.state
        for i, params in enumerate(g.blocks):
            if i not in self.active:
                for p in params:
                    state.pop(p, None)  # release the moments of a block that went inactive

    def _narrow(self) -> None:
        g = self.groups
        for i, params in enumerate(g.blocks):
            for p in params:
                p.requires_grad_(i in self.active)

    def on_train_start(self, trainer) -> None:
        if trainer.world > 1:
            raise UserError("lisa runs in a single process only; launch it without multiple processes")
        self.groups = LayerGroups(trainer.module, self.cfg)
        self._activate(trainer, trainer.state.step // self.cfg.interval)

    def on_step_start(self, trainer) -> None:
        period = trainer.state.step // self.cfg.interval
        if period != self.period:
            self._activate(trainer, period)
        self._narrow()

    def on_step_end(self, trainer) -> None:
        for params in self.groups.blocks:
            for p in params:
                p.requires_grad_(True)
        self.last_step = trainer.state.step

    def report(self) -> dict[str, Any]:
        g = self.groups
        if g is None:
            return {}
        steps = self.last_step + 1
        k, n = self.cfg.interval, len(g.blocks)
        periods = [sample_blocks(self.seed, p, n, self.cfg.gamma) for p in range(-(-steps // k))]
        active_sum = 0
        counts = [0] * n
        for p, blocks in enumerate(periods):
            steps_in_period = min(k, steps - p * k)
            active_sum += steps_in_period * (g.always_size + sum(g.block_sizes[i] for i in blocks))
            for i in blocks:
                counts[i] += 1
        active = active_sum / max(steps, 1)
        return {
            "gamma": self.cfg.gamma,
            "interval": k,
            "blocks": n,
            "steps": steps,
            "history": [[p * k, list(b)] for p, b in enumerate(periods[:HISTORY_SHOWN])],
            "periods_per_block": counts,
            "always_trained_params": g.always_size,
            # the mean over steps of what had gradients and AdamW state (count_params says 100%)
            "trainable_params_active": active,
            "trainable_active_pct": 100.0 * active / max(g.total, 1),
        }


def runtime(model, cfg: LisaConfig, ctx: MethodContext) -> LisaRuntime:
    return LisaRuntime(cfg, ctx.seed)


SPEC = register(MethodSpec("lisa", LisaConfig, apply, runtime=runtime))
