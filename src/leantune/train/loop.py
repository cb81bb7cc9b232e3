"""The training loop: short, generic, and pluggable at the optimisation step.

Why our own loop and not transformers.Trainer: MeZO, LOMO, gradient approximation and LISA replace the
step itself; with a loop this small each stays a plug-in. accelerate still gives devices, mixed
precision and DDP. The loop never asks which method is running.

Under `train.distributed=fsdp` (train/distributed.py) the model is sharded with FSDP2 before the
optimizer is built and is not given to `accelerator.prepare`; everything that needs whole tensors
(best weights, the adapter in a checkpoint, digests, the final export) gathers them collectively, and
checkpoints are written through torch.distributed.checkpoint (train/checkpoint.py), shard by shard.

Determinism and resume: the data order of epoch e depends only on (seed, e) (see batching.py), so a
checkpoint only needs (epoch, next step in epoch) to continue exactly; RNG, optimizer and scheduler
state travel in the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from leantune.config import Config
from leantune.data.arrow_features import example_lengths
from leantune.data.tasks import collate
from leantune.errors import UserError
from leantune.eval.loop import evaluate
from leantune.eval.metrics import is_better
from leantune.memory.budget import host_available_bytes, parse_budget
from leantune.memory.measure import StepPeakMeter
from leantune.methods.registry import MethodRuntime
from leantune.train import best as best_weights
from leantune.train import checkpoint as ckpt
from leantune.train import distributed as dist_mode
from leantune.train import lr_find
from leantune.train.batching import epoch_batches
from leantune.train.logging import RunLogger
from leantune.train.optim import (
    compile_blocks,
    decay_split,
    make_optimizer,
    make_scheduler,
    unwrap_optimizer,
)
from leantune.train.prefix_cache import SPILL_DIR, PrefixCache
from leantune.train.step import backprop_step


def planned_steps(tc, batches_per_epoch: int) -> int:
    """Optimizer steps of the whole run: every epoch's, capped by train.max_steps."""
    total = tc.epochs * math.ceil(batches_per_epoch / tc.grad_accum)
    return min(total, tc.max_steps) if tc.max_steps else total


def check_schedule(cfg: Config, train_data: list[dict], rank: int, world: int) -> None:
    """Refuse a warmup longer than the run, before anything is written (the steps need the data)."""
    from leantune.train.optim import warmup_steps

    tc = cfg.train
    lengths = example_lengths(train_data)
    batches = epoch_batches(lengths, tc.batch_size, tc.seed, 0, rank, world, tc.group_by_length)
    warmup_steps(tc, planned_steps(tc, len(batches)))


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    group: int = 0  # next optimizer step within the epoch
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    train_time_s: float = 0.0
    # CPU seconds of this process (all its threads) over the same steps: / train_time_s = cores kept busy
    train_cpu_time_s: float = 0.0
    gpu_util_sum: float = 0.0  # CUDA: the driver's utilisation (%) sampled at each log line, summed
    gpu_util_n: int = 0
    epoch_train_time_s: list[float] = field(default_factory=list)  # training seconds of each epoch
    eval_time_s: float = 0.0
    samples: int = 0
    tokens: int = 0
    running_loss: float = 0.0  # loss summed since the last log line (kept so resumed logs match)
    running_n: int = 0
    last_eval: dict = field(default_factory=dict)
    skipped_steps: int = 0  # updates dropped for a NaN/inf loss or gradient (train.nan_policy=skip)
    lr_auto: dict | None = None  # train.lr=auto: the range test's choice and curve (train/lr_find.py)


class Trainer:
    def __init__(
        self,
        cfg: Config,
        model,
        accelerator,
        train_data: list[dict],
        val_data: list[dict],
        pad_id: int,
        num_labels: int,
        run_dir: Path,
        runtimes: list[MethodRuntime] | None = None,
        extra_eval: Callable[[torch.nn.Module], dict] | None = None,
        identity: dict | None = None,
    ) -> None:
        self.cfg, self.acc, self.run_dir = cfg, accelerator, run_dir
        self.identity = identity or {}  # config + data fingerprint, recorded in every checkpoint
        self.train_data, self.val_data = train_data, val_data
        self.pad_id, self.num_labels = pad_id, num_labels
        self.runtimes = runtimes or []
        self.step_meter = StepPeakMeter(accelerator.device)  # read by methods in on_step_end
        self.extra_eval = extra_eval  # more validation metrics (e.g. BLEU of generations), merged in
        # The last method that brings its own step wins (a list like [freeze, mezo] means "mezo's step").
        self.step_fn = next((rt.step for rt in reversed(self.runtimes) if rt.step is not None), backprop_step)
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        tc = cfg.train
        self.fsdp = dist_mode.resolve_mode(cfg) == "fsdp"
        if self.fsdp:
            dist_mode.refuse_fsdp_runtimes(self.runtimes)
            self.model = dist_mode.shard_model(model)  # not through prepare: that would add DDP on top
        else:
            self.model = accelerator.prepare(model)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        raw_opt = make_optimizer(self.module, tc)
        if tc.compile_blocks:
            compile_blocks(self.module)
        self.optimizer = accelerator.prepare(raw_opt)
        self.lengths = example_lengths(train_data)  # tokens per training example, for the sampler
        self.batches_per_epoch = len(self._epoch_batches(0))
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / tc.grad_accum)
        self.total_steps = planned_steps(tc, self.batches_per_epoch)
        self.scheduler = make_scheduler(raw_opt, tc, self.total_steps)
        self.state = TrainState()
        self._checkpointed_best: int | None = None  # best_step of the newest published checkpoint
        verbose = accelerator.is_main_process
        self.prefix_cache = (
            PrefixCache(
                self.module,
                verbose,
                ram_bytes=parse_budget(tc.prefix_cache_ram, host_available_bytes),
                spill_path=run_dir / SPILL_DIR / f"rank{self.rank}.bin",
            )
            if tc.cache_frozen_prefix
            else None
        )
        self.log = RunLogger(run_dir, accelerator.is_main_process, accelerator, cfg.output.trackers)
        self._running = torch.zeros((), device=accelerator.device)  # no host sync per step
        self._running_n = 0

    # `methods.base.TrainerView` is what method runtimes may use of this class.
    @property
    def module(self):
        return self.acc.unwrap_model(self.model)

    @property
    def torch_optimizer(self):
        return unwrap_optimizer(self.optimizer)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        tc = self.cfg.train
        return epoch_batches(
            self.lengths, tc.batch_size, tc.seed, epoch, self.rank, self.world, tc.group_by_length
        )

    # -- checkpoints -------------------------------------------------------------------------------
    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def resume(self, path: Path | None = None) -> bool:
        """Continue from checkpoint `path` (the recipe passes the one whose identity it checked), or from
        the newest intact one."""
        path = path if path is not None else ckpt.latest_checkpoint(self.ckpt_root)
        if path is None:
            return False
        reshaping = any(rt.reshapes_parameters for rt in self.runtimes)
        if reshaping:  # such a method re-shapes the model to the checkpoint's before the weights load
            self._load_methods(path, json.loads((path / "trainer_state.json").read_text()).get("methods", []))
            self.sync_parameters()
        saved = ckpt.load_checkpoint(
            path, self.module, self.optimizer, self.rank, self.world, self.cfg.train.batch_size
        )
        saved.pop("identity", None)  # checked by the recipe before anything was written
        self.scheduler.load_state_dict(saved.pop("scheduler"))
        method_states = saved.pop("methods", [])
        if not reshaping:
            self._load_methods(path, method_states)
        self.state = TrainState(**saved)
        self._checkpointed_best = self.state.best_step
        if self.acc.is_main_process and not best_weights.settle(self.run_dir, self.state.best_step):
            self.state.best_step = self.state.best_metric = None
        self.acc.wait_for_everyone()
        self.state.best_step, self.state.best_metric = self._agreed_best()
        self._running = torch.tensor(self.state.running_loss, device=self.acc.device)
        self._running_n = self.state.running_n
        self.log.truncate_after(self.state.step)
        return True

    def _agreed_best(self) -> tuple[int | None, float | None]:
        """Rank 0 settled the best-weights file on resume; every rank takes its decision."""
        from accelerate.utils import broadcast_object_list

        pair = [self.state.best_step, self.state.best_metric]
        if self.world > 1:
            broadcast_object_list(pair, from_process=0)
        return pair[0], pair[1]

    def _load_methods(self, path: Path, method_states: list) -> None:
        method_tensors = ckpt.load_method_tensors(path, len(self.runtimes))
        for rt, state, tensors in zip(self.runtimes, method_states, method_tensors, strict=True):
            rt.load(state, tensors)

    def sync_parameters(self) -> None:
        """Re-read the trainable parameters after a method replaced some (e.g. resized LoRA factors).

        The optimizer's groups are rebuilt in `named_parameters` order, as `build_optimizer` built them,
        so checkpoints map optimizer state to parameters the same way; state stays with the parameters
        that still exist (a method may then put state of its own for new ones in `optimizer.state`).
        """
        opt = self.torch_optimizer
        decay, no_decay = decay_split(self.module)
        if len(opt.param_groups) == 2:
            opt.param_groups[0]["params"], opt.param_groups[1]["params"] = decay, no_decay
        elif not decay or not no_decay:
            opt.param_groups[0]["params"] = decay + no_decay
        else:
            raise RuntimeError("cannot add a weight-decay group the optimizer was built without")
        keep = {id(p) for p in decay + no_decay}
        for p in [p for p in opt.state if id(p) not in keep]:
            del opt.state[p]
        self.params = [p for p in self.module.parameters() if p.requires_grad]

    def _save(self) -> None:
        from accelerate.utils import gather_object

        # Every rank keeps the mean over ranks: the one number the checkpoint holds for all of them.
        self._running = self.acc.reduce(self._running, reduction="mean")
        self.state.running_loss, self.state.running_n = float(self._running), self._running_n
        rngs = gather_object([ckpt.torch_rng_state()])
        state = {
            **self.state.__dict__,
            "global_batch": self.cfg.train.batch_size * self.world,
            "scheduler": self.scheduler.state_dict(),
            "methods": [rt.state() for rt in self.runtimes],
            **({"identity": self.identity} if self.identity else {}),
        }
        args = (
            self.ckpt_root,
            self.state.step,
            self.module,
            self.optimizer,
            state,
            rngs,
            self.cfg.train.keep_checkpoints,
            [rt.tensors() for rt in self.runtimes],
            self._adapter_saver(),
        )
        if self.fsdp:  # every rank writes its shards
            ckpt.save_sharded_checkpoint(*args, self.rank)
        elif self.acc.is_main_process:
            ckpt.save_checkpoint(*args)
        self.acc.wait_for_everyone()
        self._checkpointed_best = self.state.best_step
        if self.acc.is_main_process:
            best_weights.checkpoint_published(self.run_dir, self.state.best_step)

    def _adapter_saver(self) -> Callable[[Path], None] | None:
        """Checkpoints of a peft model also hold its adapter, loadable by peft and `export --checkpoint`."""
        module = self.module
        if not hasattr(module, "peft_config"):
            return None  # the whole model is in trainable.safetensors already
        if self.fsdp:  # whole adapter tensors, gathered by every rank now, written by rank 0 later
            trainable = dist_mode.gathered_trainable(module)
            return lambda folder: module.save_pretrained(str(folder), state_dict=trainable)
        return lambda folder: module.save_pretrained(str(folder))

    def export_state_dict(self) -> dict | None:
        """Under FSDP the whole model's tensors for `save_pretrained` (on rank 0; a collective), else None."""
        return dist_mode.full_state_dict(self.module) if self.fsdp else None

    # -- evaluation --------------------------------------------------------------------------------
    def _evaluate(self) -> None:
        if not self.val_data:
            return
        t0 = time.perf_counter()
        metrics = evaluate(
            self.module,
            self.val_data,
            self.cfg.task,
            self.cfg.eval.batch_size,
            self.pad_id,
            self.rank,
            self.world,
            self.num_labels,
            lockstep=self.fsdp,
            label_names=self.cfg.data.label_names,
            threshold=self.cfg.eval.threshold,
        )
        if self.extra_eval is not None:
            metrics = {**metrics, **self.extra_eval(self.module)}
        st = self.state
        st.eval_time_s += time.perf_counter() - t0
        st.last_eval = {"step": st.step, **metrics}
        # train_time_s: the training seconds behind this point of the curve (time to quality reads it)
        record = {"step": st.step, "epoch": st.epoch, "split": "validation", **metrics}
        self.log.log({**record, "train_time_s": st.train_time_s})
        name = self.cfg.metric
        if name not in metrics:
            return
        if math.isfinite(metrics[name]) and is_better(name, metrics[name], st.best_metric):  # NaN: never best
            st.best_metric, st.best_step, st.bad_evals = metrics[name], st.step, 0
            best = dist_mode.gathered_trainable(self.module) if self.fsdp else None  # every rank gathers
            if self.acc.is_main_process:
                best = best if best is not None else ckpt.trainable_state(self.module)
                best_weights.save(self.run_dir, best, st.step, self._checkpointed_best)
        else:
            st.bad_evals += 1
            patience = self.cfg.train.early_stopping_patience
            st.stopped_early = patience is not None and st.bad_evals >= patience

    # -- the loop ----------------------------------------------------------------------------------
    def _optimizer_step(self, group: list[list[int]]):
        """Accumulate the gradients of `group`'s micro-batches, then step; return the gradient norm."""
        tc, st = self.cfg.train, self.state
        group_loss = torch.zeros((), device=self.acc.device)
        for j, idx in enumerate(group):
            batch = collate([self.train_data[i] for i in idx], self.pad_id)
            st.samples += len(idx) * self.world
            st.tokens += batch.tokens * self.world  # real tokens (a packed mask is 4-D)
            batch = {k: v.to(self.acc.device) for k, v in batch.items()}
            sync = j == len(group) - 1  # DDP all-reduces on the last micro-batch only
            cached = nullcontext()
            if self.prefix_cache:  # training micro-batches only: evaluation always runs the whole model
                cached = self.prefix_cache.micro_batch(idx, batch["attention_mask"])
            if self.fsdp:  # FSDP2 reduce-scatters only on the last micro-batch; autocast as prepare would
                self.model.set_requires_gradient_sync(sync)
                around = self.acc.autocast()
            else:
                around = nullcontext() if sync else self.acc.no_sync(self.model)
            with around, cached:
                group_loss += self.step_fn(self.model, batch, self.acc, 1.0 / len(group)).float()
        grad_norm = None  # logged as null where a method applied its update itself (no .grad left)
        if tc.max_grad_norm is not None and any(p.grad is not None for p in self.params):
            grad_norm = dist_mode.full_tensor(self.acc.clip_grad_norm_(self.params, tc.max_grad_norm))
        self._step_lr = self.scheduler.get_last_lr()[0]  # the rate this step used (logged)
        self._step_loss = group_loss  # read by the lr range test (train/lr_find.py)
        if not self._finite_step(group_loss, grad_norm):  # nan_policy=skip: no update, not logged
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self._running += group_loss
        self._running_n += len(group)
        self.optimizer.step()
        if not self.acc.optimizer_step_was_skipped:  # fp16 overflow: the step did not happen
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _finite_step(self, loss: torch.Tensor, grad_norm) -> bool:
        """train.nan_policy: a NaN/inf loss or gradient norm stops the run (a UserError naming the step,
        before the update, so no NaN reaches the weights) or, with `skip`, drops the update (counted)."""
        loss = self.acc.reduce(loss, reduction="sum")  # every rank decides alike under DDP
        bad = None if torch.isfinite(loss) else f"loss is {float(loss)}"
        fp16 = self.cfg.train.mixed_precision == "fp16"  # fp16 overflow is the loss scaler's job
        if bad is None and grad_norm is not None and not fp16 and not math.isfinite(float(grad_norm)):
            bad = f"gradient norm is {float(grad_norm)}"
        if bad is None:
            return True
        if self.cfg.train.nan_policy == "skip":
            self.state.skipped_steps += 1
            return False
        raise UserError(
            f"training stopped at step {self.state.step + 1} (epoch {self.state.epoch}): the {bad}; lower "
            "train.lr, check the data, or set train.nan_policy=skip to drop such steps"
        )

    def check_weights_finite(self) -> None:
        """NaN/inf trainable weights (a method's own update may make them) never end as a finished run."""
        if self.fsdp:
            dist_mode.resharded(self.module)
        for name, p in self.module.named_parameters():  # under FSDP whole tensors: every rank decides alike
            if p.requires_grad and not bool(torch.isfinite(dist_mode.full_tensor(p.detach())).all()):
                raise UserError(
                    f"training produced non-finite weights ({name}) by step {self.state.step}; the model "
                    "is not saved: lower train.lr or check the data"
                )

    def fit(self) -> TrainState:
        st = self.state
        self.log.start(st.step, self.cfg.model_dump(mode="json"))  # after a resume: purges later events
        self.model.train()
        try:
            self._train(st)
        finally:  # training is over, also on an error: the cache's spill file goes
            if self.prefix_cache:
                self.prefix_cache.close()
        if st.last_eval.get("step") != st.step:
            self._evaluate()  # stopped mid-epoch (max_steps): still judge the final weights
        self.acc.wait_for_everyone()
        self.check_weights_finite()
        return st

    def _train(self, st: TrainState) -> None:
        lr_find.resolve(self)  # train.lr=auto: the range test (fresh run) or the checkpoint's rate
        for rt in self.runtimes:
            rt.on_train_start(self)
        bar = tqdm(
            total=self.total_steps,
            initial=st.step,
            disable=not self.acc.is_main_process,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        try:
            self._run_steps(bar)
        finally:  # an error mid-run ends the progress line first, so it stays the last line
            bar.close()

    def _sample_gpu_utilisation(self) -> None:
        """The driver's GPU utilisation (% of the last sample period a kernel ran), at each log line.

        Through torch.cuda.utilization (NVML); it counts every process on the GPU, and a machine without
        NVML simply records no samples."""
        if not torch.cuda.is_available():
            return
        try:
            value = float(torch.cuda.utilization())
        except Exception:  # noqa: BLE001 - no NVML (pynvml missing, a MIG slice): no figure, not an error
            return
        self.state.gpu_util_sum += value
        self.state.gpu_util_n += 1

    def _run_steps(self, bar) -> None:
        tc, st = self.cfg.train, self.state
        batches, batches_epoch = [], None
        while st.step < self.total_steps and not st.stopped_early:
            if batches_epoch != st.epoch:  # every epoch has its own order, derived from (seed, epoch) alone
                batches, batches_epoch = self._epoch_batches(st.epoch), st.epoch
            t0, cpu0 = time.perf_counter(), time.process_time()
            first = st.group * tc.grad_accum
            self.step_meter.start()
            for rt in self.runtimes:
                rt.on_step_start(self)
            grad_norm = self._optimizer_step(batches[first : first + tc.grad_accum])
            self.step_meter.stop()
            for rt in self.runtimes:
                rt.on_step_end(self)
            st.step += 1
            st.group += 1
            spent = time.perf_counter() - t0
            st.train_time_s += spent
            st.train_cpu_time_s += time.process_time() - cpu0
            st.epoch_train_time_s += [0.0] * (st.epoch + 1 - len(st.epoch_train_time_s))
            st.epoch_train_time_s[st.epoch] += spent
            bar.update(1)
            if st.step % tc.log_every == 0 or st.step == self.total_steps:
                loss = float(self.acc.reduce(self._running, reduction="mean")) / max(self._running_n, 1)
                bar.set_postfix(loss=f"{loss:.4f}")
                self._sample_gpu_utilisation()
                self.log.log(
                    {
                        "step": st.step,
                        "epoch": st.epoch,
                        "loss": loss,
                        "lr": self._step_lr,
                        "grad_norm": float(grad_norm) if grad_norm is not None else None,
                        "samples_per_s": st.samples / max(st.train_time_s, 1e-9),
                    }
                )
                self._running.zero_()
                self._running_n = 0
            end_of_epoch = st.group == self.steps_per_epoch
            if (tc.eval_every and st.step % tc.eval_every == 0) or end_of_epoch:
                self._evaluate()
            if end_of_epoch:
                st.epoch, st.group = st.epoch + 1, 0
            if tc.save_every and st.step % tc.save_every == 0:
                self._save()

    def restore_best(self) -> bool:
        """Load the best evaluated weights (every rank reads the file rank 0 wrote)."""
        from safetensors.torch import load_file

        best = self.run_dir / best_weights.BEST
        if self.state.best_step is None or not best.is_file():
            return False
        self.acc.wait_for_everyone()
        if self.fsdp:
            dist_mode.load_full_trainable(self.module, load_file(str(best)))
        else:
            ckpt.load_trainable_state(self.module, load_file(str(best)))
        return True

    def weights_digest(self) -> list[str]:
        """sha256 of the trainable weights on every rank (DDP must end with identical weights)."""
        from accelerate.utils import gather_object

        h = hashlib.sha256()
        if self.fsdp:
            dist_mode.resharded(self.module)
        for name, p in self.module.named_parameters():
            if p.requires_grad:  # under FSDP the whole tensor, gathered: every rank hashes the same bytes
                h.update(name.encode())
                h.update(dist_mode.full_tensor(p.detach()).float().cpu().numpy().tobytes())
        return gather_object([h.hexdigest()])
