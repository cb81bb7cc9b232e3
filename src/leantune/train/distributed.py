"""Multi-process training: which mode a launch runs in, the process group, FSDP2 sharding, lost ranks.

`train.distributed` decides how a launch with WORLD_SIZE > 1 (torchrun, `accelerate launch`, SLURM via
torchrun) trains:
- `auto` (default): DDP when launched with several processes, a single process otherwise. DDP stays the
  default because it is not worse anywhere we measured: on CPU/gloo FSDP adds an all-gather per block in
  forward and backward, and for LoRA (the default method) the frozen base is most of the memory either
  way. Choose `fsdp` when a replica of the model plus its optimizer state does not fit one device.
- `ddp`: data-parallel through accelerate's `prepare` (DistributedDataParallel); needs a launcher.
- `fsdp`: torch's FSDP2 (`fully_shard`), per transformer block, then the root; needs a launcher.
- `none`: one process only; a multi-process launch is refused (so it cannot silently train N copies).

How FSDP2 and accelerate share the loop: accelerate's FSDP plugin does not run on CPU, so under `fsdp`
the trainer shards the model itself (`shard_model`) and does NOT pass the model to `accelerator.prepare`
(which would wrap it in DDP on top); accelerate still owns the process state (ranks, `reduce`,
`gather_object`, `wait_for_everyone`), autocast, the optimizer wrapper and gradient clipping (torch's
`clip_grad_norm_` handles the sharded DTensor gradients). The process group is created here, before
accelerate's, with our backend and timeout; accelerate then adopts it.

Faults: every collective runs under `train.distributed_timeout_s` (a rank that hangs makes the others fail
after that long). A rank that dies (killed, out of memory) closes its sockets, so the others' next
collective fails at once, and torchrun stops the remaining workers (SIGTERM) when one exits. `guard()`
turns either into one line naming the lost rank(s): each rank bumps a heartbeat counter in the launcher's
key-value store every `HEARTBEAT_S`; a rank whose counter stood still for `PROBE_S` is the lost one.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

from leantune.config import Config
from leantune.errors import EXIT_USER_ERROR, UserError

HEARTBEAT_S = 1.0  # how often each rank shows it is alive
PROBE_S = 3.0  # a rank whose heartbeat did not move for this long is reported lost
_KEY = "leantune/beat/{}"
_LEFT = "leantune/left/{}"


class RankLost(UserError):
    """Another rank of this run died or hung; this rank stops too (exit 1, one line)."""

    exit_code = 1


class _Terminated(BaseException):  # noqa: N818 - like KeyboardInterrupt: not swallowed by `except Exception`
    """SIGTERM: the launcher stops this worker (torchrun does when another worker exited)."""


def launch_world() -> tuple[int, int]:
    """(rank, world size) the launcher set in the environment; (0, 1) without a launcher."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return int(os.environ.get("RANK", "0") or 0), world


def refuse_fsdp_runtimes(runtimes: list) -> None:
    """FSDP shards fixed parameter shapes and runs plain backprop: no method step, no reshaping."""
    if any(rt.step is not None or rt.reshapes_parameters for rt in runtimes):
        raise UserError(
            "train.distributed=fsdp runs plain backprop on fixed parameter shapes; a method in "
            "this config brings its own step or reshapes parameters: use train.distributed=ddp"
        )


def resolve_mode(cfg: Config) -> str:
    """'single', 'ddp' or 'fsdp' for this launch; refuses (one line, every rank alike) what cannot work.

    Only reads the config and the environment, so every rank decides the same before any collective.
    """
    tc = cfg.train
    launched = "WORLD_SIZE" in os.environ
    _, world = launch_world()
    if tc.distributed == "none" and world > 1:
        raise UserError(
            f"train.distributed=none runs one process, but this launch has {world} (WORLD_SIZE={world}); "
            "launch one process, or set train.distributed to auto, ddp or fsdp"
        )
    if tc.distributed in ("fsdp", "ddp") and not launched:
        raise UserError(
            f"train.distributed={tc.distributed} needs a launcher that starts the processes: run "
            "`torchrun --nproc-per-node N -m leantune train ...` (or set train.distributed=auto)"
        )
    if world > 1 or tc.distributed in ("fsdp", "ddp"):
        backend = _backend(cfg)  # refuses NCCL without CUDA
        if tc.distributed == "fsdp":
            _check_fsdp_config(cfg, backend)
            return "fsdp"
        return "ddp" if world > 1 else "single"
    return "single"


def _backend(cfg: Config) -> str:
    import torch

    asked = cfg.train.distributed_backend
    cuda = torch.cuda.is_available()
    if asked == "nccl" and not cuda:
        raise UserError(
            "train.distributed_backend=nccl needs CUDA GPUs and this machine has none; "
            "use gloo (or auto) for CPU processes"
        )
    if asked == "auto":
        return "nccl" if cuda else "gloo"
    return asked


def _check_fsdp_config(cfg: Config, backend: str) -> None:
    tc = cfg.train
    unsupported = [
        ("train.compile_blocks=true", tc.compile_blocks),
        ("train.cache_frozen_prefix=true", tc.cache_frozen_prefix),
        ("train.mixed_precision=fp16 (needs a sharded gradient scaler)", tc.mixed_precision == "fp16"),
        ("eval.generate=true", cfg.eval.generate),
        ("eval.mmlu_shots", cfg.eval.mmlu_shots is not None),
    ]
    for what, on in unsupported:
        if on:
            raise UserError(
                f"train.distributed=fsdp does not support {what} yet; use train.distributed=ddp or turn "
                "it off"
            )


def check_world(n_train: int, world: int) -> None:
    """A launch with more processes than training examples cannot give every rank a batch."""
    if world > n_train:
        raise UserError(
            f"{world} processes but only {n_train} training examples: every process needs at least one; "
            f"launch at most {n_train} processes"
        )


def init_process_group(cfg: Config) -> None:
    """Create the process group (before accelerate, which adopts it) and start the heartbeat."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = _backend(cfg)
    rank, world = launch_world()
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        backend = "cpu:gloo,cuda:nccl"  # object collectives (gather_object) run on CPU tensors
    dist.init_process_group(backend, timeout=timedelta(seconds=cfg.train.distributed_timeout_s))
    _Heartbeat.start(rank)
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


class _Heartbeat:
    thread: threading.Thread | None = None
    stop = threading.Event()

    @classmethod
    def start(cls, rank: int) -> None:
        store = _store()
        if store is None or cls.thread is not None:
            return

        def beat() -> None:
            while not cls.stop.wait(HEARTBEAT_S):
                try:
                    store.add(_KEY.format(rank), 1)
                except Exception:  # the store went away (launcher gone): nothing left to tell
                    return

        store.add(_KEY.format(rank), 1)
        cls.thread = threading.Thread(target=beat, name="leantune-heartbeat", daemon=True)
        cls.thread.start()


def _store():
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:
        return None


def probe_ranks() -> tuple[list[int], list[int]] | None:
    """(lost, stopped): ranks whose heartbeat stood still for PROBE_S without leaving on purpose, and ranks
    that left on purpose (stopped on an error of their own, or finished); None: the store is gone."""
    import torch.distributed as dist

    store = _store()
    if store is None or not dist.is_initialized():
        return None
    world = dist.get_world_size()
    try:
        store.set_timeout(timedelta(seconds=5))
        before = [store.add(_KEY.format(r), 0) for r in range(world)]
        time.sleep(PROBE_S)
        after = [store.add(_KEY.format(r), 0) for r in range(world)]
        left = {r for r in range(world) if store.check([_LEFT.format(r)])}
    except Exception:  # the store itself is gone: its host (the launcher, or rank 0) died
        return None
    return [r for r in range(world) if after[r] == before[r] and r not in left], sorted(left)


def _leave(rank: int) -> None:
    """Tell the others this rank stops on purpose (so a probe does not count it as the lost one)."""
    store = _store()
    try:
        if store is not None:
            store.set(_LEFT.format(rank), "1")
    except Exception:
        pass


@contextmanager
def guard(checkpoints=None) -> Iterator[None]:
    """Turn a failure of another rank into one line (`RankLost`) naming it; a no-op in one process."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        yield
        return
    rank = dist.get_rank()
    try:
        yield
    except UserError:
        # this rank exits with its own line; torchrun SIGTERMs the ranks still running as soon as the
        # first one exits, which must not turn this rank's line into a traceback or a -15
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _leave(rank)
        stop_heartbeat()
        raise
    except (Exception, _Terminated) as exc:
        # The launcher SIGTERMs the survivors as soon as one worker died, while this rank is still
        # finding out which one: finish the probe (torchrun waits 30 s before SIGKILL), then stop.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        found = probe_ranks()
        _leave(rank)
        stop_heartbeat()
        lost, stopped = found if found is not None else ([], [])
        stopped = [r for r in stopped if r != rank]
        if not lost and not stopped and found is not None and not isinstance(exc, _Terminated):
            raise  # a failure of our own: keep its traceback
        raise RankLost(_lost_message(rank, lost, stopped, exc, checkpoints)) from None
    _leave(rank)  # done: a rank still finishing must not count this one as lost
    stop_heartbeat()


def main_decides(act: Callable[[], None]) -> None:
    """Run `act` on rank 0 only (the run folder's first writes); a UserError it raises is raised on every
    rank, with the same line and exit code.

    Why: rank 0 alone re-checks the folder under its lock (another run may have taken it meanwhile); if
    only rank 0 refused, the others would wait at the next collective and end with a lost-rank line (or
    the process-group timeout) instead of the refusal. The verdict travels as a broadcast of bytes (not
    `broadcast_object_list`, which pickles); the broadcast is itself the barrier after the writes.
    """
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        act()
        return
    refusal: UserError | None = None
    if dist.get_rank() == 0:
        try:
            act()
        except UserError as exc:
            refusal = exc
    text = str(refusal).encode() if refusal is not None else b""
    code = getattr(refusal, "exit_code", EXIT_USER_ERROR) if refusal is not None else 0
    head = torch.tensor([refusal is not None, len(text), code], dtype=torch.int64)
    dist.broadcast(head, src=0)
    if not int(head[0]):
        return
    if refusal is not None:
        body = torch.tensor(list(text), dtype=torch.uint8)
    else:
        body = torch.empty(int(head[1]), dtype=torch.uint8)
    if len(body):
        dist.broadcast(body, src=0)
    if refusal is not None:
        raise refusal
    raise _refusal(bytes(body.tolist()).decode(), int(head[2]))


def _refusal(message: str, exit_code: int) -> UserError:
    exc = UserError(message)
    exc.exit_code = exit_code  # what rank 0 exits with (2 for bad input)
    return exc


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def _lost_message(rank: int, lost: list[int], stopped: list[int], exc: BaseException, checkpoints) -> str:
    if lost:
        what = f"{_ranks(lost)} of this run was lost (it died or stopped responding)"
    elif stopped:
        what = f"{_ranks(stopped)} stopped on an error of its own (its line says which)"
    elif isinstance(exc, _Terminated):
        what = "the launcher stopped this process (SIGTERM), another rank failed"
    else:
        what = "another rank was lost"
    last = ""
    if checkpoints is not None:
        from leantune.train.checkpoint import latest_checkpoint

        found = latest_checkpoint(checkpoints)
        last = f"; the last complete checkpoint is {found.name}" if found else "; no complete checkpoint yet"
    return f"{what}; rank {rank} stopped too{last}: run the same command with --resume"


def stop_heartbeat() -> None:
    """Stop the heartbeat thread and wait for it: a thread inside a store call while the interpreter
    exits aborts the process ("terminate called without an active exception")."""
    _Heartbeat.stop.set()
    if _Heartbeat.thread is not None:
        _Heartbeat.thread.join(timeout=10)
        _Heartbeat.thread = None


# -- FSDP2 -------------------------------------------------------------------------------------------
def shard_model(model, mixed_precision: str = "no"):
    """`fully_shard` every transformer block, then the root (which takes the embeddings and the head).

    Each block is one all-gather unit; parameters stay DTensors sharded on dim 0 across the ranks.
    """
    import torch
    from torch.distributed.fsdp import fully_shard

    from leantune.models.structure import block_stacks

    odd = sorted({str(p.dtype) for p in model.parameters() if not p.dtype.is_floating_point})
    if odd:
        raise UserError(
            f"train.distributed=fsdp shards floating-point parameters only; this model has {', '.join(odd)} "
            "ones (a quantised base): use train.distributed=ddp"
        )
    if torch.cuda.is_available():
        model.to(torch.device("cuda", torch.cuda.current_device()))
    for _, stack in block_stacks(model):
        for block in stack:
            fully_shard(block)
    fully_shard(model)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def resharded(model):
    """`model` with every FSDP unit back in its sharded state. A forward without backward (evaluation)
    leaves the root unit gathered, and its `named_parameters()` would then be the whole tensors."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return model


def full_tensor(t):
    """The whole tensor of a DTensor (a collective: every rank must call it), or `t` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gathered_trainable(model) -> dict:
    """Every trainable parameter, whole, on every rank (collective under FSDP)."""
    if is_sharded(model):
        resharded(model)
    return {n: full_tensor(p.detach()).clone() for n, p in model.named_parameters() if p.requires_grad}


def full_state_dict(model) -> dict:
    """The whole model's state dict on rank 0 (on CPU), empty on the others; a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        resharded(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def like(full, target):
    """`full` (a whole tensor present on every rank) laid out like `target`: this rank's shard of it
    when `target` is a DTensor (no communication), else `full` itself."""
    if not hasattr(target, "device_mesh") or hasattr(full, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    full = full.to(device=target.device, dtype=target.dtype)
    return distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)


def load_full_trainable(model, tensors: dict) -> None:
    """Load whole trainable tensors (present on every rank) into a sharded model."""
    import torch

    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in tensors]
    if missing:
        raise RuntimeError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {missing[0]}")
    resharded(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(like(tensors[name], p))
