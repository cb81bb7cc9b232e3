"""SplitLoRA-style training (Lin et al. 2024): split learning + federated averaging of LoRA adapters.

The blocks below `split_layer` run "on clients", the rest on a "server"; both parts carry peft LoRA
adapters (the head trains on the server). Each of `clients` simulated clients keeps its own copy of the
lower-part LoRA weights and of their AdamW moments; the server part is one shared copy. Every
`rounds_every` steps the client adapters are averaged (FedAvg, uniform weights) and the average is
broadcast to every client. No library simulates this on a single process, hence this module; LoRA itself
is peft's (through `leantune.methods.lora`), and the saved adapter is a plain peft adapter holding the
averaged lower part.

Simulation, and where it is simpler than the paper:
- the split cuts the model's (first, for an encoder-decoder the encoder's) stack of blocks;
- clients run one after another in one process; there is no communication, its cost is not modelled,
  and the activations ("smashed data") cross the split uncompressed and exactly;
- optimizer step s is client s mod N's local step (with `grad_accum` 1 that is the micro-batch index mod
  N); the micro-batches of one step are never split between clients, since they share one update;
- clients hold no fixed data shard: the batches dealt round-robin come from the run's shuffled order, so
  the simulated clients are IID;
- each client's AdamW moments stay local (they are not averaged); the server's moments are shared;
- between steps the model holds the last broadcast average, so evaluations, checkpoints and the final
  adapter see the global model; the last round is closed at the final step (not when stopping early).
Client copies, their moments and the average travel through the runtime's `tensors()`, so `--resume` is
exact. Single process only: the simulation swaps weights in place, which DDP replicas would not follow.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, model_validator

from leantune.errors import UserError
from leantune.methods.lora import LoraConfig
from leantune.methods.lora import apply as apply_lora
from leantune.methods.registry import MethodContext, MethodRuntime, MethodSpec, register


class SplitLoraConfig(LoraConfig):
    name: Literal["split_lora"] = "split_lora"  # type: ignore[assignment]
    clients: int = Field(4, gt=0, description="Simulated clients sharing the lower part.")
    split_layer: int | None = Field(
        None, gt=0, description="Blocks below this index run on the clients; null: half of the blocks."
    )
    rounds_every: int = Field(10, gt=0, description="Optimizer steps per round (then FedAvg).")

    @model_validator(mode="after")
    def _every_client_trains_each_round(self) -> SplitLoraConfig:
        if self.rounds_every < self.clients:
            raise ValueError(
                f"rounds_every={self.rounds_every} < clients={self.clients} leaves clients idle in a round; "
                f"set rounds_every >= {self.clients}"
            )
        return self


def lower_prefixes(model, split_layer: int | None) -> tuple[list[str], int]:
    """Name prefixes of the client-side blocks, and the number of blocks in the stack."""
    from leantune.models.structure import find_blocks

    prefix, blocks = find_blocks(model)
    split = split_layer if split_layer is not None else len(blocks) // 2
    if not 0 < split < len(blocks):
        raise UserError(
            f"split_lora: split_layer={split} leaves no block on one side of the {len(blocks)}-block model; "
            f"set methods.N.split_layer between 1 and {len(blocks) - 1}"
        )
    return [f"{prefix}.{i}." for i in range(split)], len(blocks)


def lower_params(model, prefixes: list[str]) -> dict[str, Any]:
    return {
        n: p
        for n, p in model.named_parameters()
        if p.requires_grad and any(n.startswith(x) for x in prefixes)
    }


def apply(model, cfg: SplitLoraConfig, ctx: MethodContext):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(
            "split_lora simulates its clients in one process; launch it without multiple processes"
        )
    lower_prefixes(model, cfg.split_layer)  # validate before peft wraps the model
    model = apply_lora(model, cfg, ctx)
    prefixes, _ = lower_prefixes(model, cfg.split_layer)
    if not lower_params(model, prefixes):
        raise UserError(
            "split_lora: no LoRA layer lands in the client-side blocks; choose target_modules found there "
            "or a higher split_layer"
        )
    return model


def _average(copies: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    return {name: torch.stack([c[name] for c in copies]).mean(dim=0) for name in copies[0]}


class SplitLoraRuntime(MethodRuntime):
    lr_auto_refusal = "split_lora keeps per-client adapters and moments that its step hooks swap"

    def __init__(self, cfg: SplitLoraConfig) -> None:
        self.cfg = cfg
        self.lower: dict[str, Any] = {}  # name -> the model's client-side LoRA parameter
        self.clients: list[dict[str, Any]] = []  # per client: name -> its weights
        self.moments: list[dict[str, dict[str, Any]]] = []  # per client: name -> its AdamW state
        self.average: dict[str, Any] = {}  # the last broadcast (what every client starts a round from)
        self.rounds = 0
        self.divergence: float | None = None  # relative spread of the clients before the last averaging
        self.client_steps: list[int] = []
        self.blocks = (0, 0)

    def client_of(self, step: int) -> int:
        return step % self.cfg.clients

    def on_train_start(self, trainer) -> None:
        if trainer.world > 1:
            raise UserError("split_lora simulates its clients in one process; launch it with one process")
        prefixes, n_blocks = lower_prefixes(trainer.module, self.cfg.split_layer)
        self.blocks = (len(prefixes), n_blocks)
        self.lower = lower_params(trainer.module, prefixes)
        if not self.clients:  # a fresh start: every client begins from the same initial adapter
            init = {n: p.detach().clone() for n, p in self.lower.items()}
            self.clients = [{n: t.clone() for n, t in init.items()} for _ in range(self.cfg.clients)]
            self.moments = [{} for _ in range(self.cfg.clients)]
            self.average = init
            self.client_steps = [0] * self.cfg.clients
        else:  # resumed: checkpointed tensors come back on the CPU
            self._to_device()
        self._load_into_model(self.average)

    def _to_device(self) -> None:
        for name, p in self.lower.items():
            self.average[name] = self.average[name].to(p.device)
            for values, moments in zip(self.clients, self.moments, strict=True):
                values[name] = values[name].to(p.device)
                for key, t in moments.get(name, {}).items():
                    if t.ndim:  # AdamW keeps its step counter on the CPU
                        moments[name][key] = t.to(p.device)

    def _load_into_model(self, values: dict[str, Any]) -> None:
        import torch

        with torch.no_grad():
            for name, p in self.lower.items():
                p.copy_(values[name])

    def on_step_start(self, trainer) -> None:
        c = self.client_of(trainer.state.step)
        self._load_into_model(self.clients[c])
        state = trainer.torch_optimizer.state
        for name, p in self.lower.items():
            if name in self.moments[c]:
                state[p] = self.moments[c][name]
            else:
                state.pop(p, None)  # this client's first step: fresh moments

    def on_step_end(self, trainer) -> None:
        step = trainer.state.step
        c = self.client_of(step)
        state = trainer.torch_optimizer.state
        for name, p in self.lower.items():
            self.clients[c][name] = p.detach().clone()
            moments = state.pop(p, None)
            if moments:
                self.moments[c][name] = moments
        self.client_steps[c] += 1
        if (step + 1) % self.cfg.rounds_every == 0 or step + 1 == trainer.total_steps:
            self._aggregate()
        self._load_into_model(self.average)

    def _aggregate(self) -> None:
        import torch

        mean = _average(self.clients)
        spread = sum(float(torch.linalg.vector_norm(c[n] - mean[n]) ** 2) for c in self.clients for n in mean)
        size = sum(float(torch.linalg.vector_norm(mean[n]) ** 2) for n in mean) * len(self.clients)
        self.divergence = (spread / size) ** 0.5 if size > 0 else None
        self.average = mean
        self.clients = [{n: t.clone() for n, t in mean.items()} for _ in self.clients]
        self.rounds += 1

    def state(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "divergence": self.divergence, "client_steps": self.client_steps}

    def tensors(self) -> dict[str, Any]:
        out = {f"average/{n}": t for n, t in self.average.items()}
        for c, (values, moments) in enumerate(zip(self.clients, self.moments, strict=True)):
            out.update({f"client{c}/value/{n}": t for n, t in values.items()})
            for n, slots in moments.items():
                out.update({f"client{c}/{key}/{n}": t for key, t in slots.items()})
        return out

    def load(self, state: dict[str, Any], tensors: dict[str, Any]) -> None:
        n = self.cfg.clients
        self.rounds, self.divergence = state["rounds"], state["divergence"]
        self.client_steps = list(state["client_steps"])
        self.clients, self.moments, self.average = [{} for _ in range(n)], [{} for _ in range(n)], {}
        for key, t in tensors.items():
            where, kind_or_name = key.split("/", 1)
            if where == "average":
                self.average[kind_or_name] = t
                continue
            kind, name = kind_or_name.split("/", 1)
            c = int(where.removeprefix("client"))
            if kind == "value":
                self.clients[c][name] = t
            else:
                self.moments[c].setdefault(name, {})[kind] = t

    def report(self) -> dict[str, Any]:
        client_params = sum(p.numel() for p in self.lower.values())
        return {
            "clients": self.cfg.clients,
            "split_layer": self.blocks[0],
            "blocks": self.blocks[1],
            "rounds_every": self.cfg.rounds_every,
            "rounds": self.rounds,
            "client_steps": self.client_steps,
            "client_lora_params": client_params,
            # relative RMS distance of the client adapters from their mean just before the last averaging
            "client_divergence_at_last_round": self.divergence,
        }


def runtime(model, cfg: SplitLoraConfig, ctx: MethodContext) -> SplitLoraRuntime:
    return SplitLoraRuntime(cfg)


SPEC = register(MethodSpec("split_lora", SplitLoraConfig, apply, runtime=runtime))
