"""`leantune eval RUN_DIR --data SOURCE`: score a finished run on another dataset; `--mmlu K`: MMLU.

A file passed with --data is used whole; a built-in or `hf:` source gives its `--split` (test by default,
carved with the run's split seed exactly as in training). Labels map through the run's label names, so a
label the model was not trained on is an error with its line number, not a silent wrong answer.
A `task: ppo` run is scored as its training scored its test split: responses sampled (seeded with
`train.seed`) for the prompts and scored by the run's `ppo.reward_run`, with the KL to the reference
(recipes/rlhf.py `ppo_eval`). `--generate` (or the run's eval.generate) adds BLEU/ROUGE of generated
text for seq2seq and causal-LM runs. `--mmlu K` scores a causal-LM run, or with `--model NAME` an
untrained base model, on MMLU.
"""

from __future__ import annotations

from pathlib import Path

from leantune.errors import UserError
from leantune.outputs import check_new_file
from leantune.recipes.common import format_table, load_run_config, load_trained_model, setup_torch
from leantune.settings import HEAD_TASKS


def run_eval(
    run_dir: Path,
    source: str | None,
    split: str = "test",
    out_json: Path | None = None,
    generate: bool = False,
) -> dict:
    """Score the run's final model on `split` of `source` (default: the run's own data); every input is
    checked before the model loads, and `out_json` is written only when everything worked."""
    cfg = load_run_config(run_dir)
    generate = _check_eval_outputs(cfg, out_json, generate or cfg.eval.generate)
    if cfg.task == "ppo":
        from leantune.recipes.rlhf import check_reward_run_exists

        check_reward_run_exists(run_dir, cfg)
    data_cfg, split, rows = _eval_rows(cfg, source, split)
    setup_torch(cfg.train.seed, cfg.train.num_threads)
    n, metrics, predictions = _score_rows(run_dir, cfg, data_cfg, rows, generate)
    result = {"run_dir": str(run_dir), "data": data_cfg.source, "split": split, "n": n, **metrics}
    if out_json is not None:
        _write_eval_result(out_json, result, predictions)
    print(
        format_table(
            [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in result.items()], "leantune eval"
        )
    )
    return result


def _check_eval_outputs(cfg, out_json: Path | None, generate: bool) -> bool:
    """Refuse an existing --out (and its predictions file) and a --generate the run cannot do, before
    anything is loaded: a mistake never overwrites earlier results."""
    if out_json is not None:
        check_new_file(out_json, "--out")
    if out_json is not None and generate:
        check_new_file(out_json.with_suffix(".predictions.jsonl"), "--out's predictions file")
    if generate and (cfg.task in (*HEAD_TASKS, "prompt_classification") or cfg.data.label_column is None):
        raise UserError("--generate needs a seq2seq or causal-LM run with a target column")
    return generate


def _eval_rows(cfg, source: str | None, split: str):
    """The data config and raw rows to score. A file is used whole (one split, no subsampling: the run's
    split settings are about training); another source gives `split`, carved as in training."""
    from leantune.data.tasks import load_raw_splits

    is_file = (
        source is not None
        and not source.startswith(("builtin:", "hf:"))
        and Path(source).expanduser().is_file()
    )  # load_source expands ~ too
    data_cfg = cfg.data.model_copy(update={"source": source or cfg.data.source})
    if is_file:
        # a file is one split named "train"; the run's split names and subsampling are about training
        data_cfg = data_cfg.model_copy(
            update={
                "validation_fraction": 0.0,
                "test_fraction": 0.0,
                "train_split": "train",
                "max_train_samples": None,
            }
        )
        split = "train"  # a single file is one split; use all of it
    if split not in ("train", "validation", "test"):
        raise UserError(f"--split must be train, validation or test, not '{split}'")
    rows = getattr(load_raw_splits(data_cfg), split)
    if not rows:
        raise UserError(f"split '{split}' of {data_cfg.source} is empty; pick another --split")
    return data_cfg, split, rows


def _score_rows(run_dir: Path, cfg, data_cfg, rows: list, generate: bool) -> tuple[int, dict, list | None]:
    """Tokenise with the run's own tokenizer, load the trained model, and score: the number of examples,
    the metrics (plus generation metrics when asked) and the generated predictions (or None)."""
    from leantune.data.tasks import encode
    from leantune.eval.loop import evaluate
    from leantune.models.loader import load_tokenizer

    tok = load_tokenizer(str(run_dir / "model"))
    kind = "causal"
    if cfg.task == "prompt_classification":
        from leantune.models.prompt_head import kind_of_model

        kind = kind_of_model(cfg.model.name)
    features = encode(
        cfg.task, rows, tok, data_cfg, cfg.model.max_length, cfg.data.label_names, data_cfg.source, kind
    )
    model = load_trained_model(run_dir, cfg)
    if cfg.task == "ppo":  # prompts alone: responses sampled and scored by the run's reward model
        from leantune.recipes.rlhf import ppo_eval

        return len(features), ppo_eval(run_dir, cfg, tok, model, features), None
    metrics = evaluate(
        model,
        features,
        cfg.task,
        cfg.eval.batch_size,
        tok.pad_token_id,
        num_labels=len(cfg.data.label_names or []),
        label_names=cfg.data.label_names,
        threshold=cfg.eval.threshold,
    )
    predictions = None
    if generate:
        from leantune.eval.generation import run_generation_eval

        cap = cfg.eval.max_generate_samples
        rows = rows[:cap] if cap else rows
        generated, predictions = run_generation_eval(cfg, tok, model, rows, data_cfg=data_cfg)
        metrics = {**metrics, **generated}
    return len(features), metrics, predictions


def _write_eval_result(out_json: Path, result: dict, predictions: list | None) -> None:
    """--out: the result JSON (atomic) and, with generation, the predictions beside it."""
    from leantune.atomic import write_json_atomic

    out_json.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_json, result)
    if predictions is not None:
        from leantune.eval.generation import write_predictions

        write_predictions(out_json.with_suffix(".predictions.jsonl"), predictions)


def run_mmlu_eval(
    run_dir: Path | None,
    model_name: str | None,
    shots: int,
    questions: int | None = None,
    subjects: list[str] | None = None,
    out_json: Path | None = None,
    records: list[dict] | None = None,
) -> dict:
    """MMLU k-shot accuracy of a finished causal-LM run, or of the base model `model_name`."""
    if (run_dir is None) == (model_name is None):
        raise UserError("--mmlu scores either a run folder or --model NAME; give exactly one")
    if shots < 0:
        raise UserError(f"--mmlu takes the number of shots (0 or more), not {shots}")
    if out_json is not None:
        check_new_file(out_json, "--out")
    from leantune.eval.mmlu import load_mmlu_records, mmlu_accuracy, select_questions

    records = records if records is not None else load_mmlu_records()
    seed, threads = 0, None
    if run_dir is not None:
        cfg = load_run_config(run_dir)
        if cfg.task != "causal_lm":
            raise UserError(f"MMLU scores a causal LM; {run_dir} is a {cfg.task} run")
        seed, threads = cfg.train.seed, cfg.train.num_threads
    select_questions(records, questions, subjects, seed)  # a wrong subject fails before the model loads
    setup_torch(seed, threads)
    from leantune.models.loader import load_model, load_tokenizer

    if run_dir is not None:
        tok, model = load_tokenizer(str(run_dir / "model")), load_trained_model(run_dir, cfg)
    else:
        tok = load_tokenizer(model_name)
        model = load_model(model_name, "causal_lm", pad_token_id=tok.pad_token_id)
    scores = mmlu_accuracy(model, tok, records, shots, questions, subjects, seed)
    result = {"model": str(run_dir or model_name), "seed": seed, **scores}
    if out_json is not None:
        from leantune.atomic import write_json_atomic

        out_json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_json, result)
    rows = [
        (k, f"{result[k]:.4f}" if isinstance(result[k], float) else str(result[k]))
        for k in ("model", "shots", "n", "accuracy", "chance", "questions_with_fewer_shots")
    ]
    print(format_table(rows, f"leantune eval: MMLU {shots}-shot"))
    return result
