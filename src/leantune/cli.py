"""The `leantune` command line. No logic lives here: it parses, calls a recipe, maps errors to exit 2."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import warnings
from pathlib import Path

from leantune.errors import UserError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        print(f"leantune: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got '{text}'")
    return int(text)


def _add_train(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="fine-tune from a YAML config (default: the embedded MiniLM + LoRA job)")
    t.add_argument(
        "args",
        nargs="*",
        metavar="[CONFIG.yaml] [key=value ...]",
        help="a config file and/or dotted overrides such as train.lr=1e-4 methods.0.r=16",
    )
    t.add_argument("--resume", action="store_true", help="continue the run in output.dir from its checkpoint")
    t.add_argument(
        "--print-config",
        action="store_true",
        help="print the full resolved config (defaults included); run nothing",
    )
    t.add_argument(
        "--dry-run",
        action="store_true",
        help="validate config, run folder, data, model and methods; print the plan and the first batch; "
        "train nothing",
    )
    t.add_argument(
        "--force-resume",
        action="store_true",
        help="with --resume: continue although the config or data changed since the checkpoint "
        "(the result is then no longer one reproducible run)",
    )


def _add_eval(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="evaluate a finished run on a dataset, or a run / base model on MMLU")
    e.add_argument("run_dir", type=Path, nargs="?", help="a run folder (or give --model with --mmlu)")
    e.add_argument("--model", help="with --mmlu: score this untrained model (e.g. embedded:smollm2) instead")
    e.add_argument(
        "--mmlu", type=int, metavar="K", help="MMLU K-shot accuracy (causal LMs) instead of --data"
    )
    e.add_argument("--mmlu-questions", type=_positive_int, metavar="N", help="a seeded subset of N questions")
    e.add_argument("--mmlu-subjects", nargs="+", metavar="SUBJECT", help="only these MMLU subjects")
    e.add_argument(
        "--generate", action="store_true", help="seq2seq/causal LM: also score generations (BLEU, ROUGE...)"
    )
    e.add_argument(
        "--data", help="builtin:<name>, a .csv/.tsv/.jsonl file, or hf:<name> (default: the run's)"
    )
    e.add_argument("--split", default="test", help="split of a built-in/hf source (default: test)")
    e.add_argument("--out", type=Path, help="also write the metrics to this JSON file (must not exist)")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate text with a finished causal-LM or seq2seq run")
    g.add_argument("run_dir", type=Path)
    g.add_argument("prompt", nargs="?", help="the prompt (a chat run wraps it in its chat template)")
    g.add_argument("--file", type=Path, help='a .jsonl file of {"prompt": ...} (or {"messages": [...]})')
    g.add_argument("--out", type=Path, help="with --file: write generations.jsonl here (must not exist)")
    g.add_argument(
        "--max-new-tokens", type=_positive_int, metavar="N", help="default: the run's eval.max_new_tokens"
    )
    g.add_argument("--temperature", type=float, help="sample at this temperature (default: greedy)")
    g.add_argument("--top-p", type=float, help="sample from the top-p probability mass (default: greedy)")
    g.add_argument("--seed", type=int, default=0, help="seed of sampled decoding (default 0)")
    g.add_argument("--batch-size", type=_positive_int, default=8, metavar="N", help="prompts per batch (8)")


def _add_predict(sub: argparse._SubParsersAction) -> None:
    pr = sub.add_parser("predict", help="label a .csv/.tsv/.jsonl file with a finished classification run")
    pr.add_argument("run_dir", type=Path)
    pr.add_argument("data", type=Path, help="rows with the run's text column(s)")
    pr.add_argument("--out", type=Path, required=True, help="predictions .csv or .jsonl (must not exist)")
    pr.add_argument(
        "--batch-size", type=_positive_int, metavar="N", help="default: the run's eval.batch_size"
    )


def _add_export(sub: argparse._SubParsersAction) -> None:
    x = sub.add_parser("export", help="write a run's model as a plain HF folder")
    x.add_argument("run_dir", type=Path)
    x.add_argument("--merge", action="store_true", help="fold LoRA into the base weights")
    x.add_argument(
        "--checkpoint", metavar="STEP", help="export checkpoint step-N (or N) instead of the final model"
    )
    x.add_argument(
        "--out", type=Path, help="destination folder (default: RUN_DIR/merged or RUN_DIR/exported)"
    )


def _add_fetch(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser("fetch", help="download and cache a built-in dataset now (it is fetched on first use)")
    f.add_argument("name", help="e.g. rotten_tomatoes")


def _add_methods(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("methods", help="list the available methods")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="run a benchmark suite, one JSON artefact per run and repeat")
    b.add_argument("suite", help="a suite name in benchmarks/suites/ or a suite YAML path")
    b.add_argument(
        "--repeat", type=_positive_int, metavar="N", help="run each N times (default: the suite's repeat)"
    )
    b.add_argument("--rerun", action="store_true", help="redo runs that already have an artefact")
    b.add_argument("--only", nargs="+", metavar="ID", help="run only these run ids")
    b.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override appended to every run (repeatable), e.g. --set model.name=/models/x",
    )
    b.add_argument("--results", type=Path, metavar="DIR", help="results root (default: benchmarks/results)")
    b.add_argument(
        "--work",
        type=Path,
        metavar="DIR",
        help="keep the run folders and logs here (default: a temporary folder, removed)",
    )
    b.add_argument("--dry-run", action="store_true", help="validate the suite and list its runs; run nothing")


def _add_plan(sub: argparse._SubParsersAction) -> None:
    pl = sub.add_parser("plan", help="print the per-layer LoRA rank plan for a memory budget (no training)")
    pl.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]", help="as for `train`")
    pl.add_argument(
        "--memory-budget", help="bytes (2GiB, 512MiB, 3e9) or a fraction of available memory (0.5)"
    )
    pl.add_argument("--allow-recompute", action="store_true", help="may switch on recomputation to fit")
    pl.add_argument("--allow-batch-reduce", action="store_true", help="may halve the batch size to fit")
    pl.add_argument(
        "--allow-quantize", action="store_true", help="may plan on a 4-bit NF4 base (the quant method)"
    )
    pl.add_argument("--json", type=Path, help="also write the plan to this JSON file (must not exist)")
    pl.add_argument(
        "--auto",
        action="store_true",
        help="instead: choose method, blocks, rank and levers for the shortest expected time to quality "
        "within --memory-budget (what `methods: auto` picks; docs/methods/auto.md)",
    )
    pl.add_argument(
        "--world-size",
        type=int,
        metavar="N",
        help="instead: predict the bytes each of N processes holds (train.distributed: ddp replicates, fsdp "
        "shards)",
    )
    pl.add_argument(
        "--global-batch",
        type=int,
        metavar="G",
        help="with --world-size: rows per optimizer step over all processes (default: train.batch_size each)",
    )


def _add_report(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("report", help="write report.md and report.html from a suite's artefacts")
    r.add_argument("suite", help="a suite name or YAML path")
    r.add_argument("--results", type=Path, metavar="DIR", help="results root (default: benchmarks/results)")


def _split_train_args(args: list[str]) -> tuple[str | None, list[str]]:
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _run_train(ns: argparse.Namespace) -> None:
    from leantune.config import load_config
    from leantune.recipes.train import run_train

    path, overrides = _split_train_args(ns.args)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise UserError(f"'{bad[0]}' is not key=value; only the first argument may be a config file")
    if ns.force_resume and not ns.resume:
        raise UserError("--force-resume only applies with --resume")
    cfg = load_config(path, overrides)
    if ns.print_config:
        from leantune.config import dump_config

        print(dump_config(cfg), end="")
    elif ns.dry_run:
        from leantune.recipes.train import dry_run

        dry_run(cfg, resume=ns.resume, force_resume=ns.force_resume)
    else:
        run_train(cfg, resume=ns.resume, force_resume=ns.force_resume)


def _run_eval(ns: argparse.Namespace) -> None:
    from leantune.recipes.evaluate import run_eval, run_mmlu_eval

    if ns.mmlu is not None and (ns.data or ns.generate):
        raise UserError("--mmlu scores MMLU only; drop --data/--generate or run them separately")
    if ns.mmlu is None and (ns.mmlu_questions or ns.mmlu_subjects):
        raise UserError("--mmlu-questions/--mmlu-subjects need --mmlu K")
    if ns.mmlu is not None:
        run_mmlu_eval(ns.run_dir, ns.model, ns.mmlu, ns.mmlu_questions, ns.mmlu_subjects, ns.out)
    elif ns.model is not None or ns.run_dir is None:
        raise UserError("give a run folder (leantune eval RUN_DIR); --model is for --mmlu K only")
    else:
        run_eval(ns.run_dir, ns.data, ns.split, ns.out, ns.generate)


def _run_generate(ns: argparse.Namespace) -> None:
    from leantune.recipes.generate import run_generate

    run_generate(
        ns.run_dir,
        ns.prompt,
        ns.file,
        ns.out,
        ns.max_new_tokens,
        ns.temperature,
        ns.top_p,
        ns.seed,
        ns.batch_size,
    )


def _run_predict(ns: argparse.Namespace) -> None:
    from leantune.recipes.predict import run_predict

    run_predict(ns.run_dir, ns.data, ns.out, ns.batch_size)


def _run_export(ns: argparse.Namespace) -> None:
    from leantune.recipes.export import run_export

    run_export(ns.run_dir, ns.merge, ns.out, ns.checkpoint)


def _run_fetch(ns: argparse.Namespace) -> None:
    from leantune.data.builtin import load_builtin

    splits, _ = load_builtin(ns.name)
    print(f"{ns.name}: {sum(len(v) for v in splits.values())} rows cached")


def _run_methods(ns: argparse.Namespace) -> None:
    from leantune.methods.registry import available_methods, describe_method

    names = available_methods()
    width = max(map(len, names))
    print("\n".join(f"{n:<{width}}  {describe_method(n)}" for n in names))


def _run_bench(ns: argparse.Namespace) -> None:
    from leantune.bench.runner import run_bench

    run_bench(
        ns.suite,
        results=ns.results,
        repeat=ns.repeat,
        rerun=ns.rerun,
        only=ns.only,
        extra=ns.extra,
        dry_run=ns.dry_run,
        work=ns.work,
    )


def _run_plan(ns: argparse.Namespace) -> None:
    from leantune.config import load_config
    from leantune.recipes.plan import run_plan

    path, overrides = _split_train_args(ns.args)
    if ns.global_batch is not None and ns.world_size is None:
        raise UserError("--global-batch only applies with --world-size N")
    cfg = load_config(path, overrides)
    from leantune.recipes.auto import is_auto

    if ns.auto or is_auto(cfg):
        if ns.world_size is not None:
            raise UserError("--auto plans one process; drop --world-size (or --auto)")
        if ns.allow_recompute or ns.allow_batch_reduce or ns.allow_quantize:
            raise UserError("--allow-* shape the LoRA rank plan, not --auto's choice; drop them (or --auto)")
        from leantune.recipes.auto import run_auto_plan

        run_auto_plan(cfg, ns.memory_budget, ns.json)
        return
    if ns.world_size is not None:
        from leantune.recipes.plan import run_rank_plan

        run_rank_plan(cfg, ns.world_size, ns.global_batch, ns.memory_budget, ns.json)
        return
    run_plan(cfg, ns.memory_budget, ns.allow_recompute, ns.allow_batch_reduce, ns.json, ns.allow_quantize)


def _run_report(ns: argparse.Namespace) -> None:
    from leantune.bench.report import run_report

    run_report(ns.suite, ns.results)


# command -> (declares its arguments, runs it); the order is `leantune --help`'s
COMMANDS = {
    "train": (_add_train, _run_train),
    "eval": (_add_eval, _run_eval),
    "generate": (_add_generate, _run_generate),
    "predict": (_add_predict, _run_predict),
    "export": (_add_export, _run_export),
    "fetch": (_add_fetch, _run_fetch),
    "methods": (_add_methods, _run_methods),
    "bench": (_add_bench, _run_bench),
    "plan": (_add_plan, _run_plan),
    "report": (_add_report, _run_report),
}


#: commands whose own process runs torch work and so needs OpenMP's wait policy chosen before torch
#: loads (run_info.set_omp_wait samples the CPUs for 0.1 s). Not `bench`: its runs are child processes
#: that each choose for themselves; a choice made in the parent would reach them through the inherited
#: environment and read as the user's.
TORCH_WORK = frozenset({"train", "eval", "generate", "predict", "export", "plan"})


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="leantune", description="Efficient fine-tuning of transformer language models.")
    from leantune import __version__

    p.add_argument("--version", action="version", version=f"leantune {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add, _ in COMMANDS.values():
        add(sub)
    return p


def dispatch(ns: argparse.Namespace) -> None:
    COMMANDS[ns.command][1](ns)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # peft 0.21 calls an API transformers 5 deprecated; the user can do nothing about it
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # transformers' kernel hub warns on every offline load; an error must stay one line on stderr
    logging.getLogger("kernels").setLevel(logging.ERROR)
    try:
        ns = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed as one line)
        return int(exc.code or 0)
    if ns.command in TORCH_WORK:
        from leantune.train.run_info import set_omp_wait

        set_omp_wait()  # before anything imports torch: libgomp reads its wait policy once, when it loads
    try:
        dispatch(ns)
    except UserError as exc:
        print(f"leantune: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_USER_ERROR)  # a lost rank (train/distributed.py) exits 1
    except KeyboardInterrupt:
        again = "run the same command again" if ns.command == "bench" else "continue with --resume"
        print(f"leantune: interrupted; {again}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `leantune ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # Every write is atomic (a temporary renamed into place), so what was there before is intact.
        again = "then run the same command with --resume" if ns.command == "train" else "then run it again"
        print(
            f"leantune: error: disk full while writing {exc.filename or 'a file'}; free space, {again}",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    return 0
