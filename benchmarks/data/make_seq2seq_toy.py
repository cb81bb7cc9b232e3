"""Seed 001 Table 2 at toy scale: a pretrained-then-adapted tiny T5, since no package ships T5 weights.

LoRA adapts a *pretrained* model; on random weights it has nothing to adapt. So this script first makes
a base: a tiny random T5 (leantune.models.tiny) is fully fine-tuned to copy ("red cat" -> "red cat red
cat"). The suite `seed001-table2` then adapts that base to a related task it has not seen: the pair
reversed and repeated ("red cat" -> "cat red cat red"), with full fine-tuning, LoRA, LoRA-SP and LoRA at
half the rank, and scores generations with BLEU and ROUGE. It writes, under benchmarks/data/ (ignored by
git):
  seq2seq_copy.jsonl, seq2seq_reverse.jsonl   the two tasks (2,000 and 1,000 pairs, seeded)
  tiny-t5-copy/                               the base model, a Hugging Face folder

    python benchmarks/data/make_seq2seq_toy.py && leantune bench seed001-table2
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORDS = ["red", "blue", "green", "black", "white", "cat", "dog", "sun", "moon", "tree", "fish", "bird"]


def pairs(n: int, seed: int, target) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.sample(WORDS, 2)
        rows.append({"text": f"{a} {b}", "label": " ".join(target(a, b))})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def main() -> int:
    from leantune.config import load_config
    from leantune.models.tiny import build_tiny_model
    from leantune.recipes.train import run_train

    copy = write_jsonl(HERE / "seq2seq_copy.jsonl", pairs(2000, 0, lambda a, b: [a, b, a, b]))
    write_jsonl(HERE / "seq2seq_reverse.jsonl", pairs(1000, 1, lambda a, b: [b, a, b, a]))
    out = HERE / "tiny-t5-copy"
    with tempfile.TemporaryDirectory() as tmp:
        random_t5 = build_tiny_model("t5", Path(tmp) / "t5")
        summary = run_train(
            load_config(
                None,
                [
                    "task=seq2seq",
                    f"model.name={random_t5}",
                    f"data.source={copy}",
                    "model.max_length=16",
                    "data.max_eval_samples=100",
                    "train.batch_size=32",
                    "train.lr=3e-2",
                    "train.warmup_ratio=0",
                    "train.epochs=12",
                    "train.seed=0",
                    "train.save_every=null",
                    "methods=[full]",
                    "eval.generate=true",
                    "eval.metric=bleu",
                    "eval.max_new_tokens=8",
                    "output.tensorboard=false",
                    "output.overwrite=true",
                    f"output.dir={Path(tmp) / 'run'}",
                ],
            )
        )
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(Path(tmp) / "run" / "model", out)
    print(f"base {out}: copy-task test BLEU {summary['test']['bleu']:.1f}", file=sys.stderr)
    score_base_on_target(out)
    return 0


def score_base_on_target(base: Path) -> None:
    """The adaptation's starting point: the base's scores on the suite's test split, before training.
    The base copies, and a copy shares words and bigrams with the reversed target, so this row is the
    floor every adaptation has to beat."""
    from leantune.config import load_config
    from leantune.data.tasks import load_raw_splits
    from leantune.eval.generation import generation_eval
    from leantune.models.loader import load_model, load_tokenizer

    cfg = load_config(
        None,
        ["task=seq2seq", f"model.name={base}", f"data.source={HERE / 'seq2seq_reverse.jsonl'}"]
        + ["data.max_eval_samples=100"],
    )
    test = load_raw_splits(cfg.data).test
    scores, _ = generation_eval(
        load_model(str(base), "seq2seq"),
        load_tokenizer(str(base)),
        test,
        "text",
        "label",
        "seq2seq",
        16,
        8,
        1,
        64,
    )
    folder = HERE.parent / "results" / "seed001-table2"
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "what": "the copy-pretrained base on the reverse task's test split, before adaptation",
        "command": "python benchmarks/data/make_seq2seq_toy.py",
        "test_rows": len(test),
        "metrics": scores,
    }
    (folder / "base-before-adaptation.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"base on the reverse task before adaptation: BLEU {scores['bleu']:.1f}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
