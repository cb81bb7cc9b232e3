"""The baseline we measure ourselves against: the same job done with transformers.Trainer + peft.

`python -m leantune.bench.hf_baseline [CONFIG.yaml] key=value ... output.dir=DIR` reads a leantune config
and runs it the way a Hugging Face user would, writing the summary.json a leantune run writes (the same
`leantune.train.summary.RunSummary`, which the bench runner reads) and a metrics.jsonl of the logged
losses, so the two compare like for like.

What is identical to `leantune train`, on purpose: the data rows and splits (leantune.data.tasks), the
tokenisation and max_length, the model loading (leantune.models.loader), the seeding before the head and
the LoRA init (so both start from the same weights), batch size, gradient accumulation, epochs /
max_steps, learning rate, linear warmup steps and decay, weight decay with the usual no-decay groups,
max_grad_norm, the seed, the thread count, dynamic padding (DataCollatorWithPadding; for causal-LM
SFT DataCollatorForSeq2Seq, which pads the labels with -100 so padding is never scored) and the test
evaluation (leantune.eval.loop.evaluate on the same features). The optimizer is `adamw_torch` (plain
torch AdamW) unless the config asks for fused, so a speed difference is the framework's, not the
kernel's. What is not: the data order (Trainer's own seeded sampler), and the
Trainer does no checkpointing. With `train.eval_every` it scores the validation split every N steps
and at epoch ends, as leantune does, with leantune's evaluation and outside the timed training (the
curve for leantune.bench.time_to_quality); without it, only after training.
`train.adamw_impl=fused` gives the Trainer its fused AdamW (`adamw_torch_fused`), one of its speed
settings; otherwise `adamw_torch`.

Timing: `train_time_s` spans on_train_begin -> on_train_end, i.e. the Trainer's own `train_runtime`
(its training loop: data loading, steps, logging; not its set-up) without its rounding to 4 decimals;
the closest match to leantune's summed step time. `step_time_s` (the sum of on_step_begin ->
on_step_end, without fetching batches) is recorded too. Samples and tokens are counted in
`training_step`, not in the collator (the dataloader fetches one batch ahead).

transformers 5.x API notes: `eval_strategy` (not `evaluation_strategy`), `processing_class` (not
`tokenizer`), no `warmup_ratio` (we pass integer `warmup_steps`, computed as leantune does), and the
default optimizer is fused AdamW for torch >= 2.8.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

from leantune.errors import EXIT_USER_ERROR, UserError
from leantune.train.run_info import count_params, machine, setup_torch, versions
from leantune.train.summary import RunSummary, TrainStats, per_second

#: the tasks the baseline runs, with peft's task type for each
PEFT_TASK = {"classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}


def check_supported(cfg) -> None:
    """The baseline covers single-method LoRA or full fine-tuning of a classifier or of causal-LM SFT
    (cheap: no torch)."""
    names = [m.name for m in cfg.methods]
    if names not in (["lora"], ["full"]):
        raise UserError(
            f"hf_baseline runs methods [lora] or [full] only (got {names}); "
            "change the run's methods or make it kind: leantune"
        )
    if cfg.train.lr == "auto":  # transformers.Trainer has no range test: the baseline needs a number
        raise UserError("hf_baseline needs a number for train.lr (lr: auto is leantune's range test)")
    if cfg.task not in PEFT_TASK:
        raise UserError(f"hf_baseline supports tasks {sorted(PEFT_TASK)} only (got {cfg.task})")
    if cfg.task == "causal_lm" and (cfg.data.packing or cfg.data.format != "text" or cfg.eval.generate):
        raise UserError(
            "hf_baseline runs plain causal-LM SFT (prompt + response, scored by validation loss): "
            "set data.packing=false, data.format=text and eval.generate=false for this run"
        )
    if cfg.train.early_stopping_patience:
        raise UserError(
            "hf_baseline does not stop early (its curve is for time to quality); "
            "drop train.early_stopping_patience for this run"
        )


def total_steps(n_train: int, tc) -> int:
    """Optimizer steps of the run, exactly as leantune's loop counts them (single process)."""
    steps = tc.epochs * math.ceil(math.ceil(n_train / tc.batch_size) / tc.grad_accum)
    return min(steps, tc.max_steps) if tc.max_steps else steps


def _counting_trainer_class():
    """A Trainer that counts the samples and non-padding tokens of the batches it really trained on.

    Counting in the collator over-counts: accelerate's DataLoaderShard fetches one batch ahead (to know
    which batch is the last), so the collator sees a batch more than the loop trains on.
    """
    from transformers import Trainer

    class CountingTrainer(Trainer):
        samples = 0
        tokens = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.samples += len(inputs["input_ids"])
            self.tokens += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, num_items_in_batch)

    return CountingTrainer


def _apply_method(model, cfg):
    """peft directly, the way a Hugging Face user writes it (not leantune's method plug-ins)."""
    method = cfg.methods[0]
    if method.name == "full":
        return model
    import peft

    return peft.get_peft_model(
        model,
        peft.LoraConfig(
            task_type=PEFT_TASK[cfg.task],
            r=method.r,
            lora_alpha=method.alpha,
            lora_dropout=method.dropout,
            target_modules=method.target_modules,
            bias=method.bias,
            modules_to_save=method.modules_to_save,
        ),
    )


def run_baseline(cfg) -> dict:
    """Set up exactly as `leantune train` does, train with transformers.Trainer, score, write the run."""
    t_start = time.perf_counter()
    check_supported(cfg)
    out = _check_output(cfg)
    tok, data, model, params = _prepare(cfg)
    _fresh_output(out, cfg)
    clock: dict[str, float] = {"step_sum": 0.0, "eval_s": 0.0}
    log_lines: list[dict] = []
    args = _training_args(cfg, out, total_steps(len(data["train"]), cfg.train))
    curve = _curve_callback(cfg, tok, data, clock, log_lines)
    callbacks = [_timing_callback(clock, log_lines), curve]
    trainer, result = _train(model, tok, data, args, callbacks, cfg.task)
    # train_runtime, unrounded, without the curve's evaluations (leantune's train time excludes its own)
    train_time = clock["train_end"] - clock["train_begin"] - clock["eval_s"]
    t_eval = time.perf_counter()
    validation = _score(trainer.model, data, "validation", cfg, tok)
    eval_time = time.perf_counter() - t_eval + clock["eval_s"]
    test = _score(trainer.model, data, "test", cfg, tok)
    summary = _summary(cfg, out, params, data, trainer, (train_time, eval_time), validation, test)
    summary.baseline = _framework_report(cfg, args, clock, result)
    _write_metrics(out, log_lines, validation, trainer.state, train_time)
    trainer.model.save_pretrained(str(out / "model"))  # the adapter (or full model), for the size column
    tok.save_pretrained(str(out / "model"))
    summary.wall_time_s = time.perf_counter() - t_start
    summary.write(out / "summary.json")
    print(
        f"hf_baseline: {summary.train.steps} steps in {train_time:.1f} s, "
        f"{summary.train.samples_per_s:.1f} samples/s, test {test}"
    )
    return summary.to_dict()


def _check_output(cfg) -> Path:
    """Refuse a folder that holds a run before anything is loaded (a mistake never costs a run)."""
    out = Path(cfg.output.dir)
    if out.exists() and any(out.iterdir()) and not cfg.output.overwrite:
        raise UserError(f"output folder {out} already holds a run; set output.overwrite=true or another dir")
    return out


def _prepare(cfg):
    """Tokenizer, features, model and parameter counts, seeded at the same points as `leantune train`
    (`recipes.train.prepare`), so both runs start from the same head and adapter weights."""
    from leantune.models.flop_profile import flop_profile
    from leantune.models.loader import load_model, load_tokenizer
    from leantune.train.features import build_features

    setup_torch(cfg.train.seed, cfg.train.num_threads)
    tok = load_tokenizer(cfg.model.name)
    data = build_features(cfg, tok)
    setup_torch(cfg.train.seed, cfg.train.num_threads)  # same head/adapter init as leantune train
    model = load_model(cfg.model.name, cfg.task, cfg.model.dtype, cfg.data.label_names, tok.pad_token_id)
    model = _apply_method(model, cfg)
    params = count_params(model)
    params["flop_profile"] = flop_profile(model)  # same FLOP count as leantune's runs
    return tok, data, model, params


def _fresh_output(out: Path, cfg) -> None:
    """An empty run folder holding only the config (an earlier run there was allowed by overwrite)."""
    from leantune.config import dump_config

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")


def _timing_callback(clock: dict[str, float], log_lines: list[dict]):
    """A TrainerCallback that times training and each step into `clock` and keeps the logged losses in
    `log_lines` (our metrics.jsonl); it logs the last step too, as leantune does."""
    from transformers import TrainerCallback

    class Log(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock["train_begin"] = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            clock["train_end"] = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            clock["step_begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            clock["step_sum"] += time.perf_counter() - clock["step_begin"]
            if state.global_step == state.max_steps:
                control.should_log = True  # leantune logs the last step too; keeps the loss curves comparable

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                log_lines.append(
                    {
                        "step": state.global_step,
                        "epoch": state.epoch,
                        "loss": logs["loss"],
                        "lr": logs.get("learning_rate"),
                        "grad_norm": logs.get("grad_norm"),
                    }
                )

    return Log()


def _curve_callback(cfg, tok, data, clock: dict[str, float], log_lines: list[dict]):
    """With train.eval_every: score the validation split every N steps with leantune's own evaluation,
    as `leantune train` does, and log it with `train_time_s`, the training seconds so far without these
    evaluations (what time-to-quality reads). Not the Trainer's eval_strategy: its evaluation loop and
    metrics differ from ours, and the curve must mean the same on both sides."""
    from transformers import TrainerCallback

    every = cfg.train.eval_every

    class Curve(TrainerCallback):
        last_step = -1

        def on_step_end(self, args, state, control, model=None, **kw):
            if every and state.global_step % every == 0:
                self._score(state, model)

        def on_epoch_end(self, args, state, control, model=None, **kw):
            if every and state.global_step != self.last_step:  # leantune evaluates at epoch ends too
                self._score(state, model)

        def _score(self, state, model) -> None:
            t0 = time.perf_counter()
            was_training = model.training
            model.eval()
            metrics = _score(model, data, "validation", cfg, tok)
            model.train(was_training)
            trained = t0 - clock["train_begin"] - clock["eval_s"]
            clock["eval_s"] += time.perf_counter() - t0
            self.last_step = state.global_step
            record = {"step": state.global_step, "epoch": state.epoch, "split": "validation", **metrics}
            log_lines.append({**record, "train_time_s": trained})

    return Curve()


#: transformers.Trainer's `optim` for each train.optimizer (adamw: plain torch AdamW, as leantune's default)
HF_OPTIM = {
    "adamw": "adamw_torch",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw": "paged_adamw_32bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "adafactor": "adafactor",
    "sgd": "sgd",
}


def _hf_optim(tc) -> str:
    """The Trainer's optimizer name: train.adamw_impl=fused asks for its fused AdamW, one of the
    settings a Trainer user turns on for speed (same arithmetic as adamw_torch); else HF_OPTIM's."""
    if tc.optimizer == "adamw" and tc.adamw_impl == "fused":
        return "adamw_torch_fused"
    return HF_OPTIM[tc.optimizer]


def _training_args(cfg, out: Path, steps: int):
    """TrainingArguments equal to leantune's train section (see the module docstring for what differs)."""
    import torch
    from transformers import TrainingArguments

    from leantune.train.optim import warmup_steps

    tc = cfg.train
    return TrainingArguments(
        output_dir=str(out / "hf_trainer"),
        per_device_train_batch_size=tc.batch_size,
        gradient_accumulation_steps=tc.grad_accum,
        # the Trainer has the same lever (transformers 5 renamed group_by_length): compare like with like
        train_sampling_strategy="group_by_length" if tc.group_by_length else "random",
        num_train_epochs=tc.epochs,
        max_steps=tc.max_steps or -1,
        learning_rate=tc.lr,
        weight_decay=tc.weight_decay,
        warmup_steps=warmup_steps(tc, steps),  # an int: a float in [0, 1) would mean a ratio
        lr_scheduler_type=tc.lr_scheduler,
        lr_scheduler_kwargs={"num_cycles": tc.lr_cycles} if tc.lr_scheduler == "cosine_with_restarts" else {},
        max_grad_norm=tc.max_grad_norm if tc.max_grad_norm is not None else 0.0,
        optim=_hf_optim(tc),
        optim_args=f"momentum={tc.momentum},nesterov={tc.nesterov}" if tc.optimizer == "sgd" else None,
        adam_beta1=tc.adam_beta1,
        adam_beta2=tc.adam_beta2,
        adam_epsilon=tc.adam_epsilon,
        seed=tc.seed,
        bf16=tc.mixed_precision == "bf16",
        fp16=tc.mixed_precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=tc.log_every,
        report_to="none",
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,  # the features are exactly the model's inputs
        label_names=["labels"],  # a PeftModel hides the signature Trainer would infer this from
        disable_tqdm=True,
    )


def _train(model, tok, data, args, callbacks: list, task: str):
    """Run the counting Trainer; returns it (its model, state and counts) and `train()`'s result.
    Dynamic padding either way; SFT's labels (prompt tokens -100) are padded with -100 too."""
    import transformers
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    transformers.logging.set_verbosity_error()
    collator = (
        DataCollatorForSeq2Seq(tok, label_pad_token_id=-100)
        if task == "causal_lm"
        else DataCollatorWithPadding(tok)
    )
    trainer = _counting_trainer_class()(
        model=model,
        args=args,
        train_dataset=data["train"],
        data_collator=collator,
        processing_class=tok,
        callbacks=callbacks,
    )
    return trainer, trainer.train()


def _score(model, data, split: str, cfg, tok) -> dict:
    """leantune's own evaluation of one split (empty split: no metrics), single process."""
    from leantune.eval.loop import evaluate

    rows = data[split]
    if not rows:
        return {}
    return evaluate(
        model, rows, cfg.task, cfg.eval.batch_size, tok.pad_token_id, 0, 1, len(cfg.data.label_names or [])
    )


def _summary(cfg, out: Path, params, data, trainer, times, validation: dict, test: dict) -> RunSummary:
    """The same summary.json a leantune run writes, so the bench runner reads both alike; the
    "validation" step and the best step are the last one (the Trainer evaluates only at the end)."""
    from leantune.memory.measure import peak_memory

    train_time, eval_time = times
    step, metric = trainer.state.global_step, cfg.metric
    stats = TrainStats(
        steps=step,
        epochs_completed=int(trainer.state.epoch or 0),
        stopped_early=False,
        resumed=False,
        train_time_s=train_time,
        eval_time_s=eval_time,
        samples_per_s=per_second(trainer.samples, train_time),
        tokens_per_s=per_second(trainer.tokens, train_time),
        best_step=step if metric in validation else None,
        best_metric=validation.get(metric),
        metric=metric,
    )
    return RunSummary(
        run_dir=str(out),
        task=cfg.task,
        methods=[m.name for m in cfg.methods],
        params=params,
        data={split: len(rows) for split, rows in data.items()},
        train=stats,
        validation={"step": step, **validation} if validation else {},
        test=test,
        memory=peak_memory(),
        world_size=1,
        versions=versions(),
        machine=machine(),
        config=cfg.model_dump(mode="json"),
    )


def _framework_report(cfg, args, clock: dict[str, float], result) -> dict:
    """summary.json's "baseline": what the Trainer itself did and measured, beside our own timing."""
    return {
        "framework": "transformers.Trainer" + (" + peft" if cfg.methods[0].name == "lora" else ""),
        "optim": getattr(args.optim, "value", args.optim),
        "warmup_steps": args.warmup_steps,
        "step_time_s": clock["step_sum"],
        "train_runtime_s": result.metrics.get("train_runtime"),
        "trainer_samples_per_s": result.metrics.get("train_samples_per_second"),
    }


def _write_metrics(out: Path, log_lines: list[dict], validation: dict, state, train_time: float) -> None:
    """metrics.jsonl in leantune's format: the logged losses and curve, then the final validation record
    (unless the curve already scored the last step)."""
    last = state.global_step
    curve_has_last = any(r.get("split") == "validation" and r["step"] == last for r in log_lines)
    with (out / "metrics.jsonl").open("w", encoding="utf-8") as fh:
        for line in log_lines:
            fh.write(json.dumps(line) + "\n")
        if validation and not curve_has_last:
            record = {"step": last, "epoch": state.epoch, "split": "validation", **validation}
            fh.write(json.dumps({**record, "train_time_s": train_time}) + "\n")


def main(argv: list[str] | None = None) -> int:
    import os

    from leantune.config import load_config

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = sys.argv[1:] if argv is None else argv
    # the arguments of `leantune train`: an optional config file first, then key=value overrides
    path, overrides = (args[0], args[1:]) if args and "=" not in args[0] else (None, args)
    try:
        run_baseline(load_config(path, overrides))
    except UserError as exc:
        print(f"leantune hf_baseline: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
