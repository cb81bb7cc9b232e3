"""The benchmark harness: suites, artefacts, resume, the HF baseline, the report. No timing is asserted.

One module-scoped bench invocation (the shipped smoke suite, runs full / lora / hf_lora, 4 steps each on
the tiny BERT) feeds most tests; the rest are pure-Python checks of the suite model, the FLOP count and
the report's arithmetic.
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest

from leantune.atomic import write_json_atomic
from leantune.bench.artefact import read_artefact
from leantune.bench.peak import embeddings_trained, training_flops
from leantune.bench.report import Table, markdown
from leantune.cli import main
from tests.conftest import cli_err

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "benchmarks" / "suites" / "smoke.yaml"
SEED000 = ROOT / "benchmarks" / "suites" / "seed000-table2-core.yaml"
RUNS = ("full", "lora", "hf_lora")
REQUIRED = (
    "schema",
    "suite",
    "run_id",
    "kind",
    "repeat",
    "config",
    "versions",
    "machine",
    "seed",
    "wall_time_s",
    "train_time_s",
    "time_per_epoch_s",
    "samples_per_s",
    "tokens_per_s",
    "memory",
    "peak_memory_bytes",
    "params",
    "model_size_bytes",
    "weights_size_bytes",
    "metrics",
    "matmul_peak",
    "flops",
)


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_models, sentiment_csv):
    results = tmp_path_factory.mktemp("bench")
    argv = [
        "bench",
        str(SMOKE),
        "--results",
        str(results),
        "--only",
        *RUNS,
        "--set",
        f"model.name={tiny_models['bert']}",
        "--set",
        f"data.source={sentiment_csv}",
        "--set",
        "train.max_steps=4",
    ]
    assert main(argv) == 0
    return results, argv


def artefacts(results: Path) -> dict[str, dict]:
    return {run: json.loads((results / "smoke" / f"{run}-r1.json").read_text()) for run in RUNS}


def test_artefacts_hold_every_key_and_sane_numbers(bench):
    results, _ = bench
    arts = artefacts(results)
    assert sorted(p.name for p in (results / "smoke").glob("*.json")) == sorted(f"{r}-r1.json" for r in RUNS)
    for run, a in arts.items():
        missing = [k for k in REQUIRED if k not in a]
        assert not missing, f"{run}: missing {missing}"
        assert a["run_id"] == run and a["repeat"] == 1 and a["suite"] == "smoke"
        assert a["config"]["train"]["max_steps"] == 4 and a["steps"] == 4  # --set reached the run
        assert a["config"]["train"]["num_threads"] == 2  # the suite's thread count
        assert a["samples_per_s"] > 0 and a["tokens_per_s"] > a["samples_per_s"]
        assert 0 < a["train_time_s"] < a["wall_time_s"]
        if a["kind"] == "leantune":  # the HF Trainer baseline does not measure it
            assert 0 < a["cpu_utilisation"] <= 2.5  # 2 torch threads (and a little of the main thread's)
        assert a["time_per_epoch_s"] > a["train_time_s"]  # 4 steps are less than an epoch of 256 rows
        p = a["params"]
        assert 0 < p["trainable"] <= p["total"]
        assert a["peak_memory_bytes"] > 50 * 2**20
        assert 0 < a["weights_size_bytes"] <= a["model_size_bytes"]
        assert 0 <= a["metrics"]["test"]["accuracy"] <= 1 and "mcc" in a["metrics"]["test"]
        assert a["metrics"]["best"]["metric"] == "accuracy"
        assert a["matmul_peak"]["fp32_gflops"] > 0 and a["matmul_peak"]["bf16_gflops"] > 0
        f = a["flops"]
        assert f["embedding_params"] > 0 and f["n_total_matmul"] == p["total"] - f["embedding_params"]
        # executed work only (bench/peak.py; the HF baseline records the same flop_profile): at most the peak
        assert 0 < f["executed_flops"] <= f["useful_flops"] and 0 < f["fraction_of_fp32_peak"] <= 1
        assert (results / "smoke" / f"{run}-r1.metrics.jsonl").is_file()
    full, lora, hf = arts["full"], arts["lora"], arts["hf_lora"]
    assert full["params"]["trainable"] == full["params"]["total"]
    assert lora["params"]["trainable_pct"] < full["params"]["trainable_pct"]
    assert lora["weights_size_bytes"] < full["weights_size_bytes"] / 10  # an adapter, not the model
    # the baseline is the same job: same model, LoRA, data splits and steps
    assert hf["kind"] == "hf_baseline" and hf["baseline"]["framework"] == "transformers.Trainer + peft"
    assert hf["params"] == lora["params"] and hf["data"] == lora["data"] and hf["steps"] == lora["steps"]
    assert hf["baseline"]["optim"] == "adamw_torch"
    # the same 4 batches of 16 rows were counted as samples by both
    assert hf["samples_per_s"] * hf["train_time_s"] == pytest.approx(64)
    assert lora["samples_per_s"] * lora["train_time_s"] == pytest.approx(64)
    # all artefacts of one invocation carry the same measured peak
    assert full["matmul_peak"] == lora["matmul_peak"] == hf["matmul_peak"]


def test_finished_runs_are_kept_and_rerun_redoes_them(bench):
    results, argv = bench
    folder = results / "smoke"
    before = {r: (folder / f"{r}-r1.json").stat().st_mtime_ns for r in RUNS}
    assert main(argv) == 0  # everything finished: nothing runs
    assert {r: (folder / f"{r}-r1.json").stat().st_mtime_ns for r in RUNS} == before
    old = json.loads((folder / "lora-r1.json").read_text())
    assert main([*argv, "--rerun", "--only", "lora"]) == 0
    after = {r: (folder / f"{r}-r1.json").stat().st_mtime_ns for r in RUNS}
    assert after["lora"] != before["lora"]
    assert after["full"] == before["full"] and after["hf_lora"] == before["hf_lora"]
    new = json.loads((folder / "lora-r1.json").read_text())
    assert new["wall_time_s"] != old["wall_time_s"]  # really measured again
    assert new["matmul_peak"]["fp32_times_s"] != old["matmul_peak"]["fp32_times_s"]


def test_report_writes_table_and_html_with_plots(bench, capsys):
    results, _ = bench
    assert main(["report", str(SMOKE), "--results", str(results)]) == 0
    md = (results / "smoke" / "report.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| run ")]
    assert [r.split("|")[1].strip() for r in rows] == list(RUNS)  # one row per run, suite order
    cells = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in rows}
    assert cells["full"][3] == "1.00x"  # time relative to the full run
    assert cells["hf_lora"][5] == "1.00x"  # samples/s relative to the HF baseline
    assert cells["hf_lora"][0] == "lora r8 (HF Trainer)"
    html = (results / "smoke" / "report.html").read_text()
    assert "<table>" in html and html.count("<tr>") == 1 + len(RUNS)
    images = html.split('src="data:image/png;base64,')[1:]
    # per-metric panels, quality vs cost, scaling, per-run curves, confusion matrices (3 classifiers)
    assert len(images) == 5 and "<h2>Confusion matrices</h2>" in html
    for img in images:
        png = base64.b64decode(img.split('"', 1)[0])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_report_html_renders_in_headless_chromium(bench, tmp_path):
    from tests.test_report_layout import CHROMIUMS, chromium

    browser = chromium()
    if browser is None:
        pytest.skip(f"no Chromium on PATH (looked for {', '.join(CHROMIUMS)})")
    results, _ = bench
    html = results / "smoke" / "report.html"
    if not html.is_file():
        assert main(["report", str(SMOKE), "--results", str(results)]) == 0
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--window-size=1200,1400",
            f"--screenshot={shot}",
            html.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.size == (1200, 1400)
    colours = img.getcolors(maxcolors=256 * 256) or []
    assert len(colours) > 50  # text, table rules and plotted lines, not a blank page
    dark = sum(n for n, v in colours if v < 128)
    assert dark > 0.005 * img.size[0] * img.size[1]


# -- no training below ------------------------------------------------------------------------------


def test_suite_with_unknown_key_is_one_line_exit_2(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nruns:\n  - id: a\n    overides: [train.lr=1e-4]\n")
    line = cli_err(capsys, "bench", str(bad), "--dry-run")
    assert "runs.0.overides" in line and "'overrides'" in line
    bad.write_text("name: bad\nrepet: 2\nruns: [{id: a}]\n")
    line = cli_err(capsys, "bench", str(bad), "--dry-run")
    assert "unknown key 'repet'" in line and "'repeat'" in line


def test_bad_run_overrides_and_ids_are_caught_before_anything_runs(capsys, tmp_path):
    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\nruns:\n  - id: ok\n  - id: typo\n    overrides: [train.lrr=1]\n")
    line = cli_err(capsys, "bench", str(suite), "--results", str(tmp_path / "res"))
    assert "run 'typo'" in line and "train.lrr" in line
    assert not (tmp_path / "res").exists()  # the good first run did not start
    line = cli_err(capsys, "bench", str(SMOKE), "--only", "nope", "--dry-run")
    assert "nope" in line and "full" in line
    suite.write_text("name: s\nruns:\n  - {id: x, kind: hf_baseline, overrides: ['methods=[freeze]']}\n")
    assert "hf_baseline" in cli_err(capsys, "bench", str(suite), "--dry-run")
    suite.write_text("name: s\nruns: [{id: a}, {id: a}]\n")
    assert "twice" in cli_err(capsys, "bench", str(suite), "--dry-run")
    assert "at least 1" in cli_err(capsys, "bench", str(SMOKE), "--repeat", "0")


def test_seed000_suite_validates_and_lists_its_runs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # a bare suite name is looked up in benchmarks/suites/
    assert main(["bench", "seed000-table2-core", "--dry-run", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for run in ("full-r1", "freeze-r1", "lora-r1", "hf_lora-r1"):
        assert run in out
    assert "leantune.bench.hf_baseline" in out and "layers: 4" in out
    assert not (tmp_path / "seed000-table2-core").exists()  # a dry run writes nothing
    assert main(["bench", str(SEED000), "--dry-run", "--repeat", "2", "--results", str(tmp_path)]) == 0
    assert "lora-r2" in capsys.readouterr().out


def test_suite_env_reaches_every_run_and_its_command(capsys, tmp_path):
    from leantune.bench.runner import child_env

    suite = tmp_path / "s.yaml"
    suite.write_text(
        "name: s\nruns: [{id: a}, {id: b, env: {MALLOC_MMAP_THRESHOLD_: '0', X: '1'}}]\n"
        "env: {MALLOC_MMAP_THRESHOLD_: '131072'}\n"
    )
    assert main(["bench", str(suite), "--dry-run", "--results", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "MALLOC_MMAP_THRESHOLD_=131072 python -m leantune train" in lines[2]  # the suite's
    assert "MALLOC_MMAP_THRESHOLD_=0 X=1 python -m leantune train" in lines[3]  # the run's, over it
    env = child_env(3, {"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert env["MALLOC_MMAP_THRESHOLD_"] == "131072" and env["OMP_NUM_THREADS"] == "3"


@pytest.mark.parametrize(
    "suite", sorted(p.stem for p in (ROOT / "benchmarks" / "suites").glob("*.yaml")), ids=str
)
def test_every_shipped_suite_validates(suite, capsys, tmp_path, monkeypatch):
    """Every committed suite's runs are valid configs (a suite that breaks is found here, not after hours)."""
    monkeypatch.chdir(ROOT)
    code = main(["bench", suite, "--dry-run", "--results", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    assert "to do" in capsys.readouterr().out
    assert not (tmp_path / suite).exists()


def test_torn_artefact_counts_as_unfinished(tmp_path):
    path = tmp_path / "lora-r1.json"
    path.write_text('{"schema": 1, "run_id": "lo')
    assert read_artefact(path) is None
    write_json_atomic(path, {"schema": 1, "run_id": "lora"})
    assert read_artefact(path) == {"schema": 1, "run_id": "lora"}
    assert not list(tmp_path.glob(".*.tmp"))


def test_flop_count():
    # full fine-tuning: the familiar 6 N per token
    assert training_flops(tokens=1000, n_total=1e6, n_trainable=1e6) == 6e9
    # LoRA with 1% trainable: forward + activation gradients through everything, few weight gradients
    assert training_flops(tokens=1000, n_total=1e6, n_trainable=1e4) == pytest.approx(4.02e9)
    # whether embeddings trained is what the run recorded (tests/test_flop_count.py), not a method name
    assert embeddings_trained({"flop_profile": {"embedding_trainable": True}})
    assert not embeddings_trained({"trainable": 1})


def _fake(
    run_id: str, repeat: int, time_s: float, sps: float, acc: float, kind: str = "leantune", methods=("lora",)
) -> dict:
    return {
        "run_id": run_id,
        "repeat": repeat,
        "kind": kind,
        "methods": list(methods),
        "config": {"methods": [{"name": m, "r": 8} for m in methods]},
        "params": {"trainable_pct": 100.0 if methods == ("full",) else 1.0},
        "train_time_s": time_s,
        "samples_per_s": sps,
        "peak_memory_bytes": 2**30,
        "metrics": {"test": {"accuracy": acc, "f1": acc, "mcc": 0.5}},
        "flops": {"fraction_of_fp32_peak": 0.1},
        "machine": {},
        "versions": {},
        "matmul_peak": {"fp32_gflops": 150.0, "bf16_gflops": 300.0, "size": 64},
        "invocation": "A",
    }


def test_report_ratios_pair_repeats_and_show_median_and_spread():
    arts = [
        _fake("full", 1, 10.0, 10.0, 0.80, methods=("full",)),
        _fake("full", 2, 20.0, 5.0, 0.82, methods=("full",)),
        _fake("lora", 1, 5.0, 20.0, 0.78),
        _fake("lora", 2, 6.0, 16.0, 0.80),
        _fake("hf", 1, 8.0, 10.0, 0.78, kind="hf_baseline"),
        _fake("hf", 2, 8.0, 8.0, 0.79, kind="hf_baseline"),
    ]
    header, rows = Table(arts, ["full", "lora", "hf"]).rows()
    by = {r[0]: dict(zip(header, r, strict=True)) for r in rows}
    # lora/full per repeat: 5/10 = 0.5 and 6/20 = 0.3 -> median 0.4; never 11/30 across repeats
    assert by["lora"]["time vs full"] == "0.40x (0.30–0.50)"
    assert by["lora"]["samples/s vs hf"] == "2.00x"  # 20/10 and 16/8: no spread to show
    assert by["full"]["time vs full"] == "1.00x"
    assert by["full"]["train time (s)"] == "15.0 (10.0–20.0)"
    assert by["lora"]["accuracy"] == "0.7900 (0.7800–0.8000)"
    assert by["hf"]["method"] == "lora r8 (HF Trainer)"
    assert "MMLU 5-shot" not in header  # no run scored MMLU: no column
    arts[2]["metrics"]["mmlu"] = {"accuracy": 0.27, "n": 100, "shots": 5}
    header, rows = Table(arts, ["full", "lora", "hf"]).rows()
    by = {r[0]: dict(zip(header, r, strict=True)) for r in rows}
    assert by["lora"]["MMLU 5-shot"] == "0.270" and by["full"]["MMLU 5-shot"] == "–"
    md = markdown(Table(arts), "x", ["note"])
    assert md.count("\n| ") == 4  # header + 3 runs
    # lora's repeat 2 redone later (--rerun --only lora): its ratios are flagged, the others are not
    arts[3]["invocation"] = "B"
    header, rows = Table(arts, ["full", "lora", "hf"]).rows()
    by = {r[0]: dict(zip(header, r, strict=True)) for r in rows}
    assert by["lora"]["time vs full"].endswith("*") and by["lora"]["samples/s vs hf"].endswith("*")
    assert not by["hf"]["time vs full"].endswith("*")


def test_report_flags_runs_measured_on_a_busy_machine():
    from leantune.bench.report import _context_lines

    quiet = [_fake("lora", 1, 5.0, 20.0, 0.8), _fake("full", 1, 9.0, 10.0, 0.8, methods=("full",))]
    for a in quiet:
        a["machine"] = {"cpu_count": 2, "load_avg_1m_5m_15m": [2.4, 2.0, 1.9]}  # its own 2 threads
    assert "busy" not in " ".join(_context_lines(quiet))
    quiet[1]["machine"]["load_avg_1m_5m_15m"] = [6.5, 5.0, 3.0]
    assert "load average up to 6.5 on 2 CPUs" in " ".join(_context_lines(quiet))


def test_help_lists_bench_and_imports_nothing_heavy():
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "leantune", "--help"], capture_output=True, text=True, check=True
    )
    assert "bench" in out.stdout and "report" in out.stdout
    code = (
        "import sys, leantune.cli, leantune.bench.runner, leantune.bench.report; "
        "print(any(m in sys.modules for m in ('torch', 'transformers', 'matplotlib')))"
    )
    heavy = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert heavy.stdout.strip() == "False"  # the bench CLI imports torch/matplotlib only when it runs


def test_a_failing_run_is_one_line_and_leaves_no_artefact(capsys, tmp_path, tiny_models):
    argv = [
        "bench",
        str(SMOKE),
        "--results",
        str(tmp_path),
        "--only",
        "lora",
        "--set",
        f"model.name={tiny_models['bert']}",
        "--set",
        f"data.source={tmp_path / 'missing.csv'}",
        "--work",
        str(tmp_path / "work"),
    ]
    line = cli_err(capsys, *argv)
    assert "run 'lora-r1'" in line and "missing.csv" in line and "log:" in line
    assert not list((tmp_path / "smoke").glob("*.json"))
    assert (tmp_path / "work" / "lora-r1.log").is_file()  # the log named in the message is kept


def test_processes_launch_under_torchrun_with_the_threads_split(tmp_path):
    """`processes: N` starts torchrun with N processes and threads / N torch threads each (at least one);
    a one-process baseline cannot ask for more."""
    from leantune.bench.runner import _processes, child_command
    from leantune.bench.suite import Suite, plan

    suite = Suite.model_validate(
        {
            "name": "p",
            "threads": 2,
            "runs": [{"id": "one"}, {"id": "two", "processes": 2}, {"id": "four", "processes": 4}],
        }
    )
    one, two, four = plan(suite)
    assert "train.num_threads=2" in one.overrides and "train.num_threads=1" in two.overrides
    assert "torch.distributed.run" not in child_command(one, tmp_path)
    cmd = child_command(four, tmp_path)
    at = cmd.index("--nproc-per-node")
    assert (
        cmd[1:3] == ["-m", "torch.distributed.run"]
        and cmd[at + 1] == "4"
        and cmd[at + 2 : at + 5]
        == [
            "-m",
            "leantune",
            "train",
        ]
    )
    assert _processes(suite, two) == {"count": 2, "threads_each": 1, "oversubscribed": False}
    assert _processes(suite, four)["oversubscribed"] is True
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="processes must be 1"):
        Suite.model_validate({"name": "p", "runs": [{"id": "hf", "kind": "hf_baseline", "processes": 2}]})


def test_runs_at_the_majority_class_are_labelled_and_refused_unless_the_suite_allows_them():
    from leantune.bench.report import check_learned
    from leantune.errors import UserError

    arts = [_fake("full", 1, 10.0, 10.0, 0.80, methods=("full",)), _fake("lora_lr1e-2", 1, 5.0, 20.0, 0.55)]
    for a in arts:
        a["metrics"]["test"]["majority_accuracy"] = 0.55  # lora ends exactly at the majority share
    table = Table(arts, ["full", "lora_lr1e-2"])
    header, rows = table.rows()
    by = {r[0]: dict(zip(header, r, strict=True)) for r in rows}
    assert by["lora_lr1e-2"]["accuracy"] == "0.5500 (did not learn)" and by["full"]["accuracy"] == "0.8000"
    with pytest.raises(UserError, match="lora_lr1e-2 ended at or below the majority class"):
        check_learned(table, "s", False)
    with pytest.raises(UserError, match="allow_no_learning"):
        check_learned(table, "s", ["full"])  # a pattern that does not cover the run
    assert "time-only" in check_learned(table, "s", True)[0]
    assert "rows are marked" in check_learned(table, "s", ["*_lr1e-2"])[0]
    arts[1]["metrics"]["test"]["accuracy"] = 0.5501
    assert check_learned(Table(arts), "s", False) == []  # above the majority: nothing to say


def test_report_of_a_suite_that_did_not_learn_writes_nothing_unless_time_only(bench, capsys, tmp_path):
    import shutil

    results, _ = bench
    copy = tmp_path / "results"
    shutil.copytree(results / "smoke", copy / "smoke")
    for f in (copy / "smoke").glob("report.*"):
        f.unlink()
    for path in (copy / "smoke").glob("*-r1.json"):  # every run at the majority share (4 steps: near it)
        art = json.loads(path.read_text())
        art["metrics"]["test"]["accuracy"] = art["metrics"]["test"]["majority_accuracy"]
        path.write_text(json.dumps(art))
    assert "allow_no_learning: true" in SMOKE.read_text()  # the smoke suite times, it does not judge
    strict = tmp_path / "smoke.yaml"
    strict.write_text(SMOKE.read_text().replace("allow_no_learning: true", "allow_no_learning: false"))
    line = cli_err(capsys, "report", strict, "--results", copy)
    assert "'smoke': full, lora, hf_lora ended at or below the majority class" in line
    assert "no report written" in line and not list((copy / "smoke").glob("report.*"))
    assert main(["report", str(SMOKE), "--results", str(copy)]) == 0
    md = (copy / "smoke" / "report.md").read_text()
    assert "**DID NOT LEARN: a time-only table.** full, lora, hf_lora ended" in md
    assert md.count("(did not learn) |") == 3


def test_method_label_tells_grad_approx_modes_apart():
    """The 'exact top half, cached' control runs the grad_approx method in mode exact: a report row that
    read 'grad_approx' for it would credit the approximator with the control's accuracy."""
    from leantune.bench.report import _method_label

    def art(**method) -> dict:
        return {"kind": "leantune", "config": {"methods": [{"name": "grad_approx", **method}]}}

    assert _method_label(art(mode="approx")) == "grad_approx"
    assert _method_label(art()) == "grad_approx"
    assert _method_label(art(mode="exact")) == "grad_approx exact"
    assert _method_label(art(mode="skip")) == "grad_approx skip"
