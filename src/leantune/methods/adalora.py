"""AdaLoRA through peft (Zhang et al. 2023): SVD-shaped adapters whose triplets are pruned by an
importance score, so a fixed total rank budget moves to the layers that need it. The baseline that
`dynamic_rank` is compared with; it redistributes rank but knows nothing of memory (pruned triplets are
masked, their tensors and optimizer state stay allocated).

peft leaves two things to the training loop: the schedule needs the total number of steps (known only
once the trainer exists: set in `on_train_start`), and `update_and_allocate` must see the gradients of
every step, which our `on_step_end` hook no longer has (it runs after `zero_grad`). The runtime's step
therefore runs plain backprop and calls it after the last micro-batch of each optimizer step, i.e.
before the optimizer update rather than after it as peft's example does: the scores are computed from
the same gradients, one update earlier. The allocator's smoothed scores are checkpointed for --resume.

peft adds AdaLoRA's orthogonality regulariser to every forward's loss, evaluation included, and a model
loaded for inference (`PeftModel.from_pretrained`) crashes there on a `trainable_adapter_name` it never
set. The regulariser is a training penalty, not the task loss: `_penalise_only_in_training` adds it in
training mode only, on the trained model and (through `after_load`) on a reloaded one, so validation
and `leantune eval` report the plain task loss, comparable with every other method's.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from leantune.errors import UserError
from leantune.methods.registry import MethodConfig, MethodContext, MethodRuntime, MethodSpec, register


class AdaLoraMethodConfig(MethodConfig):
    name: Literal["adalora"] = "adalora"
    init_r: int = Field(12, gt=0, description="Starting rank of every layer.")
    target_r: int = Field(8, gt=0, description="Average rank per layer once the budget has shrunk.")
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] | None = None
    tinit_fraction: float = Field(0.1, ge=0, lt=1, description="Warm-up share of steps before pruning.")
    tfinal_fraction: float = Field(0.2, ge=0, lt=1, description="Final share of steps at fixed ranks.")
    delta_t: int = Field(10, gt=0, description="Steps between budget re-allocations.")
    orth_reg_weight: float = Field(0.5, ge=0)


def apply(model, cfg: AdaLoraMethodConfig, ctx: MethodContext):
    import peft

    from leantune.methods.lora import PEFT_TASK, check_targets, heads_to_save, layer_selection

    if cfg.target_r > cfg.init_r:
        raise UserError(f"adalora: target_r={cfg.target_r} exceeds init_r={cfg.init_r}; lower target_r")
    if cfg.tinit_fraction + cfg.tfinal_fraction >= 1:
        raise UserError(
            "adalora: tinit_fraction + tfinal_fraction must stay below 1 (no budgeting phase left)"
        )
    if isinstance(cfg.target_modules, list):
        check_targets(model, cfg.target_modules)
    modules_to_save = heads_to_save(model, ctx)
    config = peft.AdaLoraConfig(
        task_type=PEFT_TASK[ctx.task],
        init_r=cfg.init_r,
        target_r=cfg.target_r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        modules_to_save=modules_to_save,
        total_step=1000,  # placeholder: the runtime sets the real schedule when training starts
        tinit=0,
        tfinal=0,
        deltaT=cfg.delta_t,
        orth_reg_weight=cfg.orth_reg_weight,
        **layer_selection(model, cfg, ctx),
    )
    try:
        return _penalise_only_in_training(peft.get_peft_model(model, config))
    except ValueError as exc:
        raise UserError(f"adalora: {exc}; set methods.N.target_modules explicitly") from None


def _penalise_only_in_training(peft_model):
    import types

    tuner = peft_model.base_model
    penalised = tuner.forward

    def forward(self, *args, **kwargs):
        if self.training and hasattr(self, "trainable_adapter_name"):
            return penalised(*args, **kwargs)
        return self.model.forward(*args, **kwargs)

    tuner.forward = types.MethodType(forward, tuner)
    return peft_model


def after_load(model, cfg: AdaLoraMethodConfig):
    return _penalise_only_in_training(model)


class AdaLoraRuntime(MethodRuntime):
    lr_auto_refusal = (
        "adalora prunes ranks on a schedule of its own steps (state the range test would replay)"
    )

    def __init__(self, model, cfg: AdaLoraMethodConfig) -> None:
        self.model, self.cfg = model, cfg
        self._micro = 0
        self._accum = 1
        self._step = 0

    @property
    def _tuner(self):
        return self.model.base_model

    def on_train_start(self, trainer) -> None:
        total = trainer.total_steps
        config = self.model.peft_config["default"]
        config.total_step = total
        config.tinit = int(self.cfg.tinit_fraction * total)
        config.tfinal = int(self.cfg.tfinal_fraction * total)
        if config.tinit >= total - config.tfinal:
            raise UserError(
                f"adalora: {total} steps leave no budgeting phase; train longer or lower the fractions"
            )
        self._tuner.rankallocator.set_total_step(total)
        self._accum = trainer.cfg.train.grad_accum

    def on_step_start(self, trainer) -> None:
        self._micro, self._step = 0, trainer.state.step

    def step(self, model, batch, accelerator, scale):
        from leantune.models.backprop import backprop_step

        loss = backprop_step(model, batch, accelerator, scale)
        self._micro += 1
        if self._micro == self._accum:
            self._tuner.update_and_allocate(self._step)
        return loss

    def state(self) -> dict[str, Any]:
        return {"rank_pattern": self.model.peft_config["default"].rank_pattern}

    def tensors(self) -> dict[str, Any]:
        ra = self._tuner.rankallocator
        return {f"ipt.{n}": t for n, t in ra.exp_avg_ipt.items()} | {
            f"unc.{n}": t for n, t in ra.exp_avg_unc.items()
        }

    def load(self, state: dict[str, Any], tensors: dict[str, Any]) -> None:
        ra = self._tuner.rankallocator
        self.model.peft_config["default"].rank_pattern = state.get("rank_pattern")
        for key, value in tensors.items():
            kind, name = key.split(".", 1)
            (ra.exp_avg_ipt if kind == "ipt" else ra.exp_avg_unc)[name] = value.clone()
            ra.ipt[name] = torch_zeros_like(value)

    def report(self) -> dict[str, Any]:
        pattern = self.model.peft_config["default"].rank_pattern or {}
        ranks = {n: int(sum(mask)) for n, mask in pattern.items()}
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return {"ranks": ranks, "total_rank": sum(ranks.values()), "trainable_params_final": trainable}


def torch_zeros_like(value):
    import torch

    return torch.zeros_like(value)


SPEC = register(
    MethodSpec(
        "adalora",
        AdaLoraMethodConfig,
        apply,
        runtime=lambda model, cfg, ctx: AdaLoraRuntime(model, cfg),
        after_load=after_load,
    )
)
