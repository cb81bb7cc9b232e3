"""`leantune train`: config -> data -> model -> methods -> loop -> test evaluation -> summary.

Everything that can fail on bad input (config, data, model, method targets, output folder) is checked
before the first byte is written, so a mistake never costs an earlier run.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leantune.config import Config, dump_config
from leantune.errors import UserError
from leantune.methods.registry import MethodSpec
from leantune.models.reward import attach_pair_loss, method_task
from leantune.recipes.common import count_params, machine, setup_torch, versions
from leantune.train.features import build_features
from leantune.train.summary import RunSummary, TrainStats, format_summary, per_second, quality_warnings

__all__ = ["build_features", "format_summary", "prepare", "quality_warnings", "run_train"]


def _check_output(cfg: Config, resume: bool, force_resume: bool) -> tuple[Path, list[str]]:
    """The run folder, checked before anything is read or written (see `leantune.runfolder`)."""
    from leantune.recipes.resume import check_resume_config
    from leantune.runfolder import check_output_dir

    out = Path(cfg.output.dir).expanduser()
    check_output_dir(out, resume, cfg.output.overwrite, _has_checkpoint)
    changed = check_resume_config(cfg, out, force_resume) if resume else []
    return out, changed


def _has_checkpoint(run: Path) -> bool:
    from leantune.train.checkpoint import latest_checkpoint

    return latest_checkpoint(run / "checkpoints") is not None


def check_positions(cfg: Config, positions: int | None) -> None:
    """The longest input (model.max_length) plus what methods put before it (soft prompts, prefixes)
    must fit the model's positions: otherwise the first long batch would fail mid-run."""
    if not positions:
        return
    added = [(i, m) for i, m in enumerate(cfg.methods) if m.added_positions()]
    total = cfg.model.max_length + sum(m.added_positions() for _, m in added)
    if total <= positions:
        return
    if not added:
        raise UserError(
            f"model.max_length={cfg.model.max_length} exceeds the {positions} positions of "
            f"{cfg.model.name}; set model.max_length <= {positions}"
        )
    i, first = added[0]
    extra = total - cfg.model.max_length
    room = f"set model.max_length <= {positions - extra} or " if positions > extra else ""
    raise UserError(
        f"model.max_length={cfg.model.max_length} + {extra} virtual tokens (methods.{i} {first.name}) "
        f"= {total} exceeds the {positions} positions of {cfg.model.name}; {room}use fewer virtual tokens"
    )


def _check_model_fits(cfg: Config, model, num_labels: int) -> None:
    from leantune.models.loader import positions_of

    check_positions(cfg, positions_of(model.config))  # a hub model: its positions are known only now
    if cfg.task == "multi_label" and num_labels < 1:
        raise UserError(
            f"the training data of {cfg.data.source} names no label at all; multi_label needs label sets "
            "in data.label_column"
        )
    if cfg.task in ("classification", "prompt_classification") and num_labels < 2:
        raise UserError(
            f"the training data of {cfg.data.source} has {num_labels} class(es) "
            f"({cfg.data.label_names}); classification needs at least 2: check data.label_column"
        )


@dataclass
class Prepared:
    """Everything a run needs, built and validated before anything is written."""

    cfg: Config
    out: Path
    accelerator: Any
    tokenizer: Any
    data: dict[str, list[dict]]
    model: Any
    params: dict[str, float]
    specs: list[MethodSpec]
    generation_rows: dict[str, list] | None = None  # raw validation/test rows when eval.generate is on
    mmlu_records: list[dict] | None = None  # when eval.mmlu_shots is set
    identity: dict | None = None  # config + data fingerprint, recorded in every checkpoint
    resume_changes: list[str] | None = None  # what --force-resume let change since the checkpoint
    runtimes: list | None = None  # each method's runtime, built and checked before anything is written
    resume_from: Path | None = None  # the checkpoint whose config and data identity prepare checked
    prompt_head: dict | None = None  # task prompt_classification: kind, template, label words and tokens
    rss_before_model: dict | None = None  # this rank's RSS right before the model loaded (peak reset there)
    task_runtime: object | None = None  # task ppo's runtime (train/ppo.py), last in `runtimes`
    methods_auto: dict | None = None  # methods: auto: the resolved choice and its reasons (recipes/auto.py)

    def trainer(self):
        from leantune.eval.generation import generation_evaluator
        from leantune.train.loop import Trainer

        runtimes = self.runtimes if self.runtimes is not None else method_runtimes(self)
        return Trainer(
            self.cfg,
            self.model,
            self.accelerator,
            self.data["train"],
            self.data["validation"],
            self.tokenizer.pad_token_id,
            len(self.cfg.data.label_names or []),
            self.out,
            runtimes,
            identity=self.identity,
            extra_eval=self._ppo_evaluator("validation")
            if self.task_runtime is not None
            else generation_evaluator(
                self.cfg,
                self.tokenizer,
                self.generation_rows["validation"],
                self.accelerator.process_index,
                self.accelerator.num_processes,
            )
            if self.generation_rows
            else None,
        )

    def _ppo_evaluator(self, split: str):
        """Scores sampled responses to `split`'s prompts under the reward model (train/ppo.py)."""
        rows, cfg = self.data[split], self.cfg
        return lambda module: self.task_runtime.evaluate(module, rows, cfg.eval.batch_size, cfg.train.seed)


def _absolute_local_paths(cfg: Config) -> None:
    """Record local model/data paths and a PPO run's reward run absolutely, so `eval`/`export` work from
    any folder later (a path that does not exist is kept as typed: its own check names it)."""
    for section, key in ((cfg.model, "name"), (cfg.data, "source"), (cfg.ppo, "reward_run")):
        value = getattr(section, key)
        if value and ":" not in value and Path(value).expanduser().exists():
            setattr(section, key, str(Path(value).expanduser().resolve()))


def prepare(cfg: Config, resume: bool = False, force_resume: bool = False) -> Prepared:
    from leantune.train import distributed

    mode = distributed.resolve_mode(cfg)  # refuses an impossible launch on every rank, before anything
    _absolute_local_paths(cfg)
    out, changed = _check_output(cfg, resume, force_resume)
    from leantune.train.logging import check_trackers

    check_trackers(cfg.output.trackers)  # a missing tracker package: one line, before any model loads
    setup_torch(cfg.train.seed, cfg.train.num_threads)

    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    from leantune.train.logging import TRACKERS_DIR

    if mode != "single":
        distributed.init_process_group(cfg)  # our backend and timeout; accelerate adopts the group

    from leantune.methods import MethodContext, apply_methods, get_method
    from leantune.methods.registry import load_options
    from leantune.models.loader import declared_positions, load_model, load_tokenizer

    # accelerate keeps one process-wide state; a second run in the same process (tests, benchmarks) with
    # another precision must start from a clean one. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    acc = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        cpu=not torch.cuda.is_available(),
        log_with=cfg.output.trackers or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / TRACKERS_DIR)),
    )
    check_positions(cfg, declared_positions(cfg.model.name))  # before the tokenizer, data and model load
    tok = load_tokenizer(cfg.model.name)
    data = build_features(cfg, tok)
    distributed.check_world(len(data["train"]), acc.num_processes)
    _check_optimization(cfg, data["train"], acc, mode == "fsdp")  # before the model loads
    identity = _run_identity(cfg, data)
    resume_from: Path | None = None
    if resume:
        from leantune.recipes.resume import check_resume_identity

        resume_from, found = check_resume_identity(out, identity["config"], identity["data"], force_resume)
        changed += [d for d in found if d not in changed]  # config.yaml and checkpoint may both tell
    gen_rows, mmlu = _final_eval_data(cfg)
    setup_torch(cfg.train.seed, cfg.train.num_threads)  # same head/adapter init however data loading went
    rss_before_model = _rss_mark()
    options = load_options(cfg.methods, cfg.task, cfg.model.dtype)  # e.g. a quantised base at load time
    model = load_model(
        cfg.model.name, cfg.task, cfg.model.dtype, cfg.data.label_names, tok.pad_token_id, options
    )
    model = apply_methods(model, cfg.methods, MethodContext(task=method_task(cfg.task), seed=cfg.train.seed))
    if cfg.task == "reward":
        attach_pair_loss(model)
    prompt_head = None
    if cfg.task == "prompt_classification":
        from leantune.models.prompt_head import setup_label_words

        prompt_head = setup_label_words(model, tok, cfg.data, cfg.model.name)
    if cfg.task == "dpo":  # the frozen reference: the adapter disabled, or a copy of the base taken now
        from leantune.models.dpo import attach_dpo_loss

        attach_dpo_loss(model, cfg.dpo.beta)
    task_runtime = None
    if cfg.task == "ppo":  # the reward run is checked here, before anything is written
        from leantune.recipes.rlhf import ppo_runtime

        task_runtime = ppo_runtime(cfg, tok, model)
    _name_portable_base(model, cfg.model.name)
    _check_model_fits(cfg, model, len(cfg.data.label_names or []))
    if cfg.data.packing:
        from leantune.data.packing import check_packing

        check_packing(model, len(tok), cfg.model.name)
    params = count_params(model)
    from leantune.models.flop_profile import flop_profile

    params["flop_profile"] = flop_profile(model)  # what a step multiplies, for the bench's FLOP count
    if params["trainable"] == 0:
        raise UserError(
            "the configured methods leave no trainable parameter; loosen `freeze` or add a method"
        )
    specs = [get_method(m.name) for m in cfg.methods]
    prep = Prepared(cfg, out, acc, tok, data, model, params, specs, gen_rows, mmlu, identity, changed)
    prep.resume_from = resume_from
    prep.prompt_head = prompt_head
    prep.rss_before_model = rss_before_model
    prep.task_runtime = task_runtime
    prep.runtimes = method_runtimes(prep) + ([task_runtime] if task_runtime is not None else [])
    for runtime in prep.runtimes:  # settings a method cannot honour: refused before the first write
        runtime.check_run(cfg, acc.num_processes)
    from leantune.train.lr_find import check_lr_auto

    check_lr_auto(cfg, prep.runtimes)
    if mode == "fsdp":
        distributed.refuse_fsdp_runtimes(prep.runtimes)
    return prep


def _check_optimization(cfg: Config, train_data: list[dict], acc, fsdp: bool) -> None:
    """The optimizer and schedule this run names, checked against the machine and the run's length."""
    from leantune.train.loop import check_schedule
    from leantune.train.optim import check_optimizer

    check_optimizer(cfg.train, acc.device.type == "cuda", fsdp)
    check_schedule(cfg, train_data, acc.process_index, acc.num_processes)


def method_runtimes(prep: Prepared) -> list:
    """One runtime per configured method that has one, in config order."""
    from leantune.methods import MethodContext

    cfg = prep.cfg
    names = tuple(m.name for m in cfg.methods)
    ctx = MethodContext(task=method_task(cfg.task), seed=cfg.train.seed, methods=names)
    return [
        spec.runtime(prep.model, mcfg, ctx)
        for spec, mcfg in zip(prep.specs, cfg.methods, strict=True)
        if spec.runtime
    ]


def _name_portable_base(model, model_name: str) -> None:
    """Saved adapters name their base by hub id or the user's own path, not this machine's cache path."""
    from leantune.models.embedded import portable_name

    for adapter in getattr(model, "peft_config", {}).values():
        adapter.base_model_name_or_path = portable_name(model_name)


def _rss_mark() -> dict | None:
    """This process's RSS now, with the kernel's peak counter reset: the peak from here on is what the
    model, its training and its evaluation took (what `leantune plan --world-size` predicts per rank),
    without the interpreter, the libraries and the tokenised data below it. None where Linux's
    counters are missing."""
    import importlib.util

    import torch.distributed.fsdp  # noqa: F401 - libraries the run imports anyway, imported before the mark

    from leantune.memory.budget import current_rss, start_peak_window

    if importlib.util.find_spec("peft") is not None:
        import peft  # noqa: F401 - ~185 MB of RSS (it pulls in bitsandbytes): not the model's memory

    from leantune.memory.budget import library_rss

    return {"rss": current_rss(), "libraries": library_rss()} if start_peak_window() else None


def _memory_per_rank(prep: Prepared) -> dict:
    """Every rank's peak RSS since its model started loading, less the shared libraries' code paged in
    meanwhile (`library_rss`), and the RSS before it (a collective): rank 0's own peak alone says
    nothing about the others under FSDP/DDP."""
    from accelerate.utils import gather_object

    from leantune.memory.budget import library_rss, peak_rss_in_window

    peak, base = peak_rss_in_window(), prep.rss_before_model
    mine = {"rss_before_model": None, "peak_rss_since_model": peak, "library_growth": None}
    mine["model_peak_bytes"] = None
    if peak is not None and base is not None and base["rss"] is not None:
        libraries = (library_rss() or 0) - (base["libraries"] or 0)
        mine.update(rss_before_model=base["rss"], library_growth=libraries)
        mine["model_peak_bytes"] = peak - base["rss"] - libraries
    ranks = gather_object([mine]) if prep.accelerator.num_processes > 1 else [mine]
    return {f"{key}_per_rank": [r[key] for r in ranks] for key in mine}


def _run_identity(cfg: Config, data: dict) -> dict:
    from leantune.data.fingerprint import data_fingerprint

    rows = {split: len(examples) for split, examples in data.items()}
    return {"config": dump_config(cfg), "data": data_fingerprint(cfg.data.source, rows)}


def _final_eval_data(cfg: Config) -> tuple[dict[str, list] | None, list[dict] | None]:
    """Rows for generation metrics and MMLU questions, loaded before anything is written."""
    gen_rows = mmlu = None
    if cfg.eval.generate:
        from leantune.eval.generation import generation_rows

        gen_rows = generation_rows(cfg)
    if cfg.eval.mmlu_shots is not None:
        from leantune.eval.mmlu import check_records, load_mmlu_records

        mmlu = load_mmlu_records()
        check_records(mmlu)
    return gen_rows, mmlu


def _params_after_training(at_start: dict, model) -> dict:
    """The counts of the trained model. Methods that resize parameters while training (dynamic_rank plans
    its ranks in on_train_start) would otherwise be reported by their probe shapes; the counts at start
    are kept beside them when they differ."""
    from leantune.models.flop_profile import flop_profile

    now = count_params(model)
    if now["trainable"] == at_start["trainable"]:
        return at_start
    start = {k: v for k, v in at_start.items() if k != "flop_profile"}
    return {**now, "flop_profile": flop_profile(model), "at_start": start}


def run_train(cfg: Config, resume: bool = False, force_resume: bool = False) -> dict:
    t_start = time.perf_counter()
    prep = _prepare_resolved(cfg, resume, force_resume)
    from leantune.runfolder import RunFolder
    from leantune.train.distributed import guard, main_decides

    folder = RunFolder(prep.out)
    try:
        with guard(prep.out / "checkpoints"):  # a lost rank: one line naming it, not a hang
            prep.accelerator.wait_for_everyone()  # every rank checked the output folder before rank 0 writes

            def first_writes() -> None:
                folder.acquire()  # held until the run ends: a second run on this folder is refused
                _start_writing(prep, folder, resume)
                print(start_banner(prep, resume), flush=True)

            main_decides(first_writes)  # rank 0 writes; its refusal stops every rank with the same line
            return _train_and_report(prep, resume, t_start)
    finally:
        folder.release()


def _prepare_resolved(cfg: Config, resume: bool, force_resume: bool) -> Prepared:
    """`prepare` on the config with `methods: auto` resolved first (recipes/auto.py): the trainer and
    every method only ever see a concrete method list."""
    from leantune.recipes.auto import format_choice, resolve_for_run

    cfg, record = resolve_for_run(cfg, resume)
    prep = prepare(cfg, resume, force_resume)
    prep.methods_auto = record
    if record is not None and prep.accelerator.is_main_process:
        print(format_choice(record), flush=True)
    return prep


def _start_writing(prep: Prepared, folder, resume: bool) -> None:
    """The first writes of a run: clear an earlier run's own files, mark the folder, save the config."""
    from leantune import __version__
    from leantune.atomic import write_text_atomic
    from leantune.runfolder import check_output_dir, config_sha256

    text = dump_config(prep.cfg)
    if resume and prep.resume_from is not None:
        from leantune.recipes.resume import check_still_newest

        check_still_newest(prep.out, prep.resume_from)
    if not resume:  # check_output_dir allowed it: an empty folder, overwrite, or a start that failed
        # again, under the lock: a run on this folder may have finished while this one loaded its model
        check_output_dir(prep.out, False, prep.cfg.output.overwrite, _has_checkpoint, held=True)
        folder.clear_previous_run()
        folder.write_marker(config_sha256(text), __version__)
    write_text_atomic(prep.out / "config.yaml", text)  # never torn for --resume to read
    if prep.methods_auto is not None and not resume:  # --resume reads it back (recipes/auto.py)
        from leantune.atomic import write_json_atomic
        from leantune.recipes.auto import RECORD

        write_json_atomic(prep.out / RECORD, prep.methods_auto)


def _train_and_report(prep: Prepared, resume: bool, t_start: float) -> dict:
    """Train, score the final model, and (on the main process) save it and write summary.json."""
    acc = prep.accelerator
    trainer = prep.trainer()
    resumed = trainer.resume(prep.resume_from) if resume else False
    if prep.methods_auto is not None and not resumed:
        record = prep.methods_auto
        trainer.log.log(
            {"step": 0, "split": "methods_auto", "chosen": record["chosen"], "reasons": record["reasons"]}
        )
    state = trainer.fit()
    trainer.restore_best()
    test, predictions = _final_test(prep, trainer)
    summary = _build_summary(prep, trainer, state, resumed, test, _final_mmlu(prep, trainer))
    export_state = trainer.export_state_dict()  # FSDP: whole tensors on rank 0 (every rank takes part)
    if acc.is_main_process:
        _write_results(prep, trainer, summary, predictions, t_start, export_state)
    trainer.log.final(state.step, summary.to_dict())
    trainer.log.close()
    acc.wait_for_everyone()
    return summary.to_dict()


def _confusion(cfg: Config, matrix: list | None) -> dict | None:
    """summary.json's `confusion`: the test split's counts, rows true and columns predicted class."""
    return None if matrix is None else {"labels": list(cfg.data.label_names or []), "matrix": matrix}


def _final_test(prep: Prepared, trainer) -> tuple[dict, list | None]:
    """The test metrics of the final (best) model, plus generation metrics and the predictions behind
    them when eval.generate is on; every process scores its share."""
    from leantune.eval.loop import evaluate

    cfg, tok, acc = prep.cfg, prep.tokenizer, prep.accelerator
    test = {}
    if prep.data["test"]:
        test = evaluate(
            trainer.module,
            prep.data["test"],
            cfg.task,
            cfg.eval.batch_size,
            tok.pad_token_id,
            acc.process_index,
            acc.num_processes,
            trainer.num_labels,
            lockstep=trainer.fsdp,
            label_names=cfg.data.label_names,
            threshold=cfg.eval.threshold,
            confusion=True,
        )
    if prep.task_runtime is not None:
        test.update(prep._ppo_evaluator("test")(trainer.module))
    predictions = None
    if prep.generation_rows and prep.generation_rows["test"]:
        from leantune.eval.generation import run_generation_eval

        generated, predictions = run_generation_eval(
            cfg, tok, trainer.module, prep.generation_rows["test"], acc.process_index, acc.num_processes
        )
        test.update(generated)
    return test, predictions


def _final_mmlu(prep: Prepared, trainer) -> dict | None:
    """k-shot MMLU accuracy after training (eval.mmlu_shots), without the per-question predictions."""
    if prep.mmlu_records is None:
        return None
    from leantune.eval.mmlu import mmlu_accuracy

    cfg, acc = prep.cfg, prep.accelerator
    mmlu = mmlu_accuracy(
        trainer.module,
        prep.tokenizer,
        prep.mmlu_records,
        cfg.eval.mmlu_shots,
        cfg.eval.mmlu_questions,
        seed=cfg.train.seed,
        rank=acc.process_index,
        world=acc.num_processes,
    )
    mmlu.pop("predictions")
    return mmlu


def _build_summary(
    prep: Prepared, trainer, state, resumed: bool, test: dict, mmlu: dict | None
) -> RunSummary:
    """The run's summary, gathered on every process (the weights digest is a collective call); peak
    memory is read here, after the test evaluation and before the model is saved."""
    from leantune.memory.measure import peak_memory
    from leantune.recipes.rlhf import rlhf_report

    cfg = prep.cfg
    digests = trainer.weights_digest()
    stats = TrainStats(
        steps=state.step,
        epochs_completed=state.epoch,
        stopped_early=state.stopped_early,
        skipped_steps=state.skipped_steps,
        resumed=resumed,
        resume_forced_changes=prep.resume_changes or None,
        train_time_s=state.train_time_s,
        epoch_train_time_s=state.epoch_train_time_s,
        train_cpu_time_s=state.train_cpu_time_s,
        gpu_utilisation_pct=state.gpu_util_sum / state.gpu_util_n if state.gpu_util_n else None,
        eval_time_s=state.eval_time_s,
        samples_per_s=per_second(state.samples, state.train_time_s),
        tokens_per_s=per_second(state.tokens, state.train_time_s),
        best_step=state.best_step,
        best_metric=state.best_metric,
        metric=cfg.metric,
        prefix_cache=trainer.prefix_cache.report() if trainer.prefix_cache else None,
    )
    return RunSummary(
        run_dir=str(prep.out),
        task=cfg.task,
        methods=[m.name for m in cfg.methods],
        method_reports=method_reports(prep.specs, cfg.methods, trainer),
        params=_params_after_training(prep.params, trainer.module),
        data={split: len(rows) for split, rows in prep.data.items()},
        train=stats,
        validation=state.last_eval,
        test={k: v for k, v in test.items() if k != "confusion_matrix"},
        confusion=_confusion(cfg, test.get("confusion_matrix")),
        mmlu=mmlu,
        memory={**peak_memory(trainer.step_meter), **_memory_per_rank(prep)},
        world_size=prep.accelerator.num_processes,
        distributed="fsdp" if trainer.fsdp else ("ddp" if prep.accelerator.num_processes > 1 else "none"),
        weights_sha256_per_rank=digests,
        versions=versions(),
        machine=machine(),
        config=cfg.model_dump(mode="json"),
        prompt_head=prep.prompt_head,
        rlhf=rlhf_report(cfg.task, prep.task_runtime, trainer.log.path),
        lr_auto=state.lr_auto,
        methods_auto=prep.methods_auto,
    )


def _write_results(
    prep: Prepared, trainer, summary: RunSummary, predictions, t_start: float, export_state: dict | None
) -> None:
    """The main process's writes, model first: summary.json last, so its presence means a finished run.
    The model card is made from the summary as it stands before the wall time and warnings are added;
    `export_state` holds the whole tensors of an FSDP-sharded model (None otherwise)."""
    out = prep.out
    _save_model(trainer.module, prep.tokenizer, out / "model", summary.to_dict(), export_state)
    if predictions is not None:
        from leantune.eval.generation import write_predictions

        write_predictions(out / "predictions.jsonl", predictions)
    summary.wall_time_s = time.perf_counter() - t_start
    summary.warnings = quality_warnings(summary)
    summary.write(out / "summary.json")
    print(format_summary(summary))
    for warning in summary.warnings:
        print(f"leantune: warning: {warning}", file=sys.stderr)


def dry_run(cfg: Config, resume: bool = False, force_resume: bool = False) -> dict:
    """Validate everything a run would (config, run folder, data, model, methods), print what it would
    train and the first batch's shapes, and train and write nothing (`leantune train --dry-run`)."""
    import math

    from leantune.data.tasks import collate

    prep = _prepare_resolved(cfg, resume, force_resume)
    train = prep.data["train"]
    first = collate(
        [train[i] for i in range(min(len(train), cfg.train.batch_size))], prep.tokenizer.pad_token_id
    )
    tc = cfg.train
    steps = tc.epochs * math.ceil(math.ceil(len(train) / tc.batch_size) / tc.grad_accum)
    steps = min(steps, tc.max_steps) if tc.max_steps else steps
    shapes = {k: list(v.shape) for k, v in first.items()}
    print(start_banner(prep, resume).replace("leantune: training", "leantune: dry run, would train", 1))
    print(f"first batch: {', '.join(f'{k} {tuple(v)}' for k, v in shapes.items())}; {steps} optimizer steps")
    print(f"nothing was trained or written to {prep.out}")
    return {"first_batch": shapes, "steps": steps, "params": prep.params}


def start_banner(prep: Prepared, resume: bool) -> str:
    """One line before the first step: what is trained, on what, and the memory its parameters pin."""
    cfg, p = prep.cfg, prep.params
    rows = "/".join(str(len(prep.data[split])) for split in ("train", "validation", "test"))
    # weights + gradients + AdamW's two moments of the trainable part, in the model's dtype (4 bytes)
    static = (p["total"] + 3 * p["trainable"]) * 4 / 2**20
    return (
        f"leantune: {'resuming' if resume else 'training'} {' + '.join(m.name for m in cfg.methods)} on "
        f"{cfg.model.name} ({cfg.task}); data {rows} train/validation/test rows; trainable "
        f"{p['trainable']:,} of {p['total']:,} ({p['trainable_pct']:.3f}%); parameters and optimizer "
        f"state ~{static:,.0f} MiB; {threads_note()}; run folder {prep.out}"
    )


def threads_note() -> str:
    """The torch threads this run uses and why (train/run_info.py's choice), for the run's first line."""
    from leantune.train.run_info import THREADS

    note = f"{THREADS.get('threads', '?')} torch threads ({THREADS.get('source', 'torch default')})"
    if THREADS.get("omp_wait_source"):  # set by the CLI (not when leantune is used as a library)
        policy = (THREADS.get("omp_wait_policy") or "default").lower()
        note += f", OpenMP waits {policy} ({THREADS['omp_wait_source']})"
    return note


def method_reports(specs: list[MethodSpec], configs: list, trainer) -> dict[str, dict]:
    """Each method's own numbers: its static report plus what its runtime measured during training."""
    runtimes = iter(trainer.runtimes)
    out: dict[str, dict] = {}
    for i, (spec, mcfg) in enumerate(zip(specs, configs, strict=True)):
        report = dict(spec.report(trainer.module, mcfg)) if spec.report else {}
        if spec.runtime:
            report.update(next(runtimes).report())
        if report:
            out[spec.name if spec.name not in out else f"{spec.name}.{i}"] = report
    return out


def _save_model(module, tok, dest: Path, summary: dict | None = None, state_dict: dict | None = None) -> None:
    """A PEFT model saves its adapter, others everything, with a model card from `summary` (when given);
    written to a temp folder, then renamed. `state_dict`: the whole tensors of a sharded (FSDP) model,
    gathered on this rank."""
    from leantune.atomic import write_folder_atomic
    from leantune.models.embedded import portable_name
    from leantune.recipes.card import model_card

    is_adapter = hasattr(module, "peft_config")
    base = portable_name(summary["config"]["model"]["name"]) if summary else None
    card = model_card(summary, base, is_adapter) if summary else None

    def write(folder: Path) -> None:
        module.save_pretrained(str(folder), **({"state_dict": state_dict} if state_dict is not None else {}))
        tok.save_pretrained(str(folder))
        if card is not None:
            (folder / "README.md").write_text(card, encoding="utf-8")  # replaces peft's empty template

    write_folder_atomic(dest, write)
