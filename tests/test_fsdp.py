"""`leantune train` under torchrun with `train.distributed=fsdp`: FSDP2 over gloo on CPU.

What each check rules out:
- a sharded run that trains differently from one process    -> the loss of each of the first 20 steps
  matches a 1-process run at the same global batch (2 x 4 = 1 x 8) within 1e-4 relative (fp32, no
  dropout), and the gathered final weights match it too;
- ranks that end apart                                        -> identical digests of the gathered weights;
- pickles in checkpoints                                      -> every checkpoint file is JSON or safetensors;
- a checkpoint tied to its world size                         -> 2 -> 1 and 1 -> 2 resumes give the same
  next-step loss as the uninterrupted run;
- a dead rank that hangs the others                           -> kill -9 of rank 1 stops rank 0 within
  seconds, with one line naming rank 1; --resume continues from the last complete checkpoint;
- bad launches                                                -> one line, exit 2, on every rank.
Heavy tests (several torchrun launches each) run only in CI or with LEANTUNE_FULL_TESTS=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.conftest import FULL, cli_err

SRC = Path(__file__).resolve().parents[1] / "src"
heavy = pytest.mark.skipif(not FULL, reason="several torchrun launches: CI=true or LEANTUNE_FULL_TESTS=1")
STEPS = 20
RESUME_FROM = 10


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("WORLD_SIZE", None)
    return env


def _cmd(processes: int, args: list[str]) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "leantune", "train", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free rendezvous port: other test runs may share the machine
        "--nproc-per-node",
        str(processes),
        "-m",
        "leantune",
        "train",
        *args,
    ]


def _launch(processes: int, args: list[str], log: Path, timeout: float = 240, ok: bool = True) -> int:
    with log.open("w") as fh:
        proc = subprocess.Popen(
            _cmd(processes, args), env=_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"hung for {timeout} s:\n{log.read_text()[-3000:]}")
    if ok:
        assert rc == 0, log.read_text()[-4000:]
    return rc


@pytest.fixture(scope="module")
def no_dropout_bert(tiny_models, tmp_path_factory) -> Path:
    """The tiny BERT without dropout: the 2-rank and 1-rank runs then compute the same function."""
    dest = tmp_path_factory.mktemp("bert-nodrop") / "bert"
    shutil.copytree(tiny_models["bert"], dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def _overrides(model: Path, data: Path, run_dir: Path, method: str = "full") -> list[str]:
    return [
        f"model.name={model}",
        "model.max_length=16",
        f"data.source={data}",
        "data.max_train_samples=256",  # 16 steps of 2 x 8 per epoch: no rank repeats an example
        f"methods=[{method}]",
        "train.epochs=2",  # the 20 steps cross an epoch boundary
        "train.grad_accum=2",
        "train.lr=2e-3",
        f"train.max_steps={STEPS}",
        "train.num_threads=1",
        "train.save_every=5",
        "train.keep_checkpoints=10",
        "train.log_every=1",
        "train.eval_every=7",
        "output.tensorboard=false",
        f"output.dir={run_dir}",
    ]


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and r.get("split") is None}


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    model = run_dir / "model"
    name = (
        "adapter_model.safetensors"
        if (model / "adapter_model.safetensors").is_file()
        else "model.safetensors"
    )
    return load_file(str(model / name))


def _pair(model: Path, data: Path, root: Path, method: str) -> tuple[Path, Path]:
    """The same job on 2 FSDP ranks at batch 4 and on 1 process at batch 8."""
    fsdp, single = root / "fsdp", root / "single"
    _launch(
        2,
        [*_overrides(model, data, fsdp, method), "train.batch_size=4", "train.distributed=fsdp"],
        root / "f.log",
    )
    _launch(1, [*_overrides(model, data, single, method), "train.batch_size=8"], root / "s.log")
    return fsdp, single


@pytest.fixture(scope="module")
def full_runs(no_dropout_bert, sentiment_csv, tmp_path_factory) -> tuple[Path, Path]:
    return _pair(no_dropout_bert, sentiment_csv, tmp_path_factory.mktemp("fsdp-full"), "full")


def _check_matches(fsdp: Path, single: Path, mode: str = "fsdp") -> tuple[float, float]:
    a, b = json.loads((fsdp / "summary.json").read_text()), json.loads((single / "summary.json").read_text())
    assert a["world_size"] == 2 and a["distributed"] == mode and b["world_size"] == 1
    digests = a["weights_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    la, lb = _losses(fsdp), _losses(single)
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    rel = max(abs(la[s] - lb[s]) / abs(lb[s]) for s in lb)
    assert rel < 1e-4, (rel, la, lb)
    wa, wb = _weights(fsdp), _weights(single)
    assert sorted(wa) == sorted(wb)
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wb)
    assert diff < 1e-5, diff
    records = [json.loads(ln) for ln in (fsdp / "metrics.jsonl").read_text().splitlines()]
    keys = Counter((r["step"], r.get("split", "train")) for r in records)
    assert [k for k, n in keys.items() if n > 1] == [], "more than one rank wrote metrics.jsonl"
    print(f"{mode}: max relative loss difference {rel:.2e}, max weight difference {diff:.2e}")
    return rel, diff


def test_fsdp_full_finetuning_matches_one_process(full_runs):
    fsdp, single = full_runs
    _check_matches(fsdp, single)
    # The checkpoint: DCP's shards (one safetensors per rank) inside the atomic folder, and no pickles.
    from safetensors import safe_open

    step = fsdp / "checkpoints" / f"step-{RESUME_FROM:08d}"
    shards = sorted(p.name for p in (step / "dcp").iterdir())
    assert len(shards) == 2 and all(name.endswith(".safetensors") for name in shards), shards
    manifest = json.loads((step / "manifest.json").read_text())
    assert {f"dcp/{name}" for name in shards} <= set(manifest)
    for file in step.rglob("*"):
        if file.is_file():
            if file.suffix == ".json":
                json.loads(file.read_text())
            else:
                assert file.suffix == ".safetensors", file
                with safe_open(str(file), "pt"):
                    pass


@heavy
def test_fsdp_lora_matches_one_process(no_dropout_bert, sentiment_csv, tmp_path):
    fsdp, single = _pair(no_dropout_bert, sentiment_csv, tmp_path, "{name: lora, r: 4, dropout: 0.0}")
    _check_matches(fsdp, single)
    ckpt_model = fsdp / "checkpoints" / f"step-{RESUME_FROM:08d}" / "model"
    assert (ckpt_model / "adapter_model.safetensors").is_file()


def _resume_copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    config = yaml.safe_load((dest / "config.yaml").read_text())
    config["output"]["dir"] = str(dest)
    (dest / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (dest / "checkpoints" / "latest").write_text(f"step-{RESUME_FROM:08d}")
    for name in ("summary.json", "model"):
        path = dest / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return dest


@heavy
@pytest.mark.parametrize("direction", ["2->1", "1->2"])
def test_resume_on_another_world_size(full_runs, direction, tmp_path):
    fsdp, single = full_runs
    if direction == "2->1":
        run = _resume_copy(fsdp, tmp_path / "run")
        args = [str(run / "config.yaml"), "train.batch_size=8", "train.distributed=auto", "--resume"]
        _launch(1, args, tmp_path / "resume.log")
    else:
        run = _resume_copy(single, tmp_path / "run")
        args = [str(run / "config.yaml"), "train.batch_size=4", "train.distributed=fsdp", "--resume"]
        _launch(2, args, tmp_path / "resume.log")
    got, want = _losses(run), _losses(fsdp if direction == "2->1" else single)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train"]["resumed"] is True and summary["train"]["steps"] == STEPS
    for step in range(RESUME_FROM + 1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-4), step


def _worker_of_rank(launcher: int, rank: int) -> int | None:
    for child in Path("/proc").iterdir():
        if not child.name.isdigit():
            continue
        try:
            stat = (child / "stat").read_text().rsplit(")", 1)[1].split()
            environ = (child / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[1]) == launcher and f"RANK={rank}".encode() in environ:
            return int(child.name)
    return None


def _fault(run: Path, args: list[str], log: Path, how: signal.Signals) -> tuple[str, float, int]:
    """Start 2 FSDP ranks, wait for a checkpoint, send `how` to rank 1; (log, seconds until rank 0's
    line or the launcher's exit, exit code)."""
    with log.open("w") as fh:
        proc = subprocess.Popen(
            _cmd(2, args), env=_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 90
            while not (run / "checkpoints" / "latest").is_file():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            victim = _worker_of_rank(proc.pid, 1)  # torchrun's workers are its children
            assert victim is not None
            os.kill(victim, how)
            hit = time.monotonic()
            while proc.poll() is None and "leantune: error:" not in log.read_text():
                assert time.monotonic() < hit + 60, f"rank 0 still waits:\n{log.read_text()[-3000:]}"
                time.sleep(0.2)
            stopped_after = time.monotonic() - hit
            if how == signal.SIGSTOP:
                os.kill(victim, signal.SIGKILL)  # else torchrun waits 30 s on the frozen worker
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return log.read_text(), stopped_after, rc


def _one_lost_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith("leantune: error:")]
    assert len(lines) == 1, text[-3000:]
    assert "rank 1 of this run was lost" in lines[0] and "--resume" in lines[0], text[-3000:]
    assert "[rank0]: Traceback" not in text, text[-3000:]
    return lines[0]


@heavy
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker of rank 1 through /proc")
def test_killed_rank_stops_the_others_then_resume(no_dropout_bert, sentiment_csv, tmp_path):
    """kill -9: rank 0's next collective fails at once (the socket closed); the line comes after the
    heartbeat probe (PROBE_S), and torchrun exits."""
    run = tmp_path / "run"
    args = [
        *_overrides(no_dropout_bert, sentiment_csv, run),
        "train.max_steps=60",
        "train.epochs=10",
        "train.batch_size=4",
        "train.distributed=fsdp",
    ]
    text, stopped_after, rc = _fault(run, args, tmp_path / "killed.log", signal.SIGKILL)
    line = _one_lost_line(text)
    print(f"rank 0 stopped {stopped_after:.1f} s after rank 1 was killed: {line}")
    assert rc != 0 and stopped_after < 30

    last = (run / "checkpoints" / "latest").read_text().strip()
    assert last in line
    _launch(2, [str(run / "config.yaml"), "--resume"], tmp_path / "r.log")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train"]["resumed"] is True and summary["train"]["steps"] == 60
    assert sorted(_losses(run)) == list(range(1, 61)), "the resumed run lost or repeated log lines"


@heavy
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker of rank 1 through /proc")
def test_hung_rank_stops_the_others_after_the_timeout(no_dropout_bert, sentiment_csv, tmp_path):
    """SIGSTOP: rank 1 is alive but silent; rank 0's collective times out after
    train.distributed_timeout_s, then the probe names rank 1 (its heartbeat stopped too)."""
    run = tmp_path / "run"
    args = [
        *_overrides(no_dropout_bert, sentiment_csv, run),
        "train.max_steps=200",
        "train.epochs=20",
        "train.batch_size=4",
        "train.distributed=fsdp",
        "train.distributed_timeout_s=10",
    ]
    text, stopped_after, rc = _fault(run, args, tmp_path / "hung.log", signal.SIGSTOP)
    line = _one_lost_line(text)
    print(f"rank 0 stopped {stopped_after:.1f} s after rank 1 froze (timeout 10 s): {line}")
    assert rc != 0 and 10 <= stopped_after < 40


@heavy
def test_torchrun_auto_is_ddp_and_matches_one_process(full_runs, no_dropout_bert, sentiment_csv, tmp_path):
    """Plain torchrun (no accelerate launcher, no ACCELERATE_USE_CPU): auto means DDP, gradients sync."""
    _, single = full_runs
    ddp = tmp_path / "ddp"
    _launch(2, [*_overrides(no_dropout_bert, sentiment_csv, ddp), "train.batch_size=4"], tmp_path / "d.log")
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["distributed"] == "ddp"
    _check_matches(ddp, single, "ddp")


# -- bad input: one line, exit 2, before any collective ----------------------------------------------
def test_fsdp_without_a_launcher_says_torchrun(capsys, monkeypatch, base_overrides):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    line = cli_err(capsys, "train", *base_overrides, "train.distributed=fsdp")
    assert "torchrun --nproc-per-node" in line


def test_none_under_a_multi_process_launch_is_refused(capsys, monkeypatch, base_overrides):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    line = cli_err(capsys, "train", *base_overrides, "train.distributed=none")
    assert "train.distributed=none" in line and "2" in line
    assert not (Path(base_overrides[-1].split("=", 1)[1])).exists(), "nothing may be written"


def test_nccl_on_a_machine_without_cuda_is_refused(capsys, monkeypatch, base_overrides):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setenv("WORLD_SIZE", "2")
    line = cli_err(capsys, "train", *base_overrides, "train.distributed_backend=nccl")
    assert "nccl" in line and "gloo" in line


def test_fsdp_refuses_what_it_does_not_support_yet(capsys, monkeypatch, base_overrides):
    monkeypatch.setenv("WORLD_SIZE", "2")
    line = cli_err(capsys, "train", *base_overrides, "train.distributed=fsdp", "train.compile_blocks=true")
    assert "compile_blocks" in line and "ddp" in line


def test_more_processes_than_training_examples_is_refused():
    from leantune.errors import UserError
    from leantune.train.distributed import check_world

    check_world(3, 3)
    with pytest.raises(UserError, match="4 processes but only 3 training examples"):
        check_world(3, 4)


def test_resume_on_another_world_size_needs_the_same_global_batch(tmp_path):
    from leantune.errors import UserError
    from leantune.train.checkpoint import check_world

    state = {"world_size": 2, "global_batch": 8}
    check_world(state, tmp_path, 1, 8)  # 1 x 8 == 2 x 4
    check_world(state, tmp_path, 4, 2)
    with pytest.raises(UserError, match="train.batch_size=8 to keep its global batch of 8"):
        check_world(state, tmp_path, 1, 4)
    with pytest.raises(UserError, match="launch it with 2"):
        check_world({"world_size": 2}, tmp_path, 1, 8)  # a checkpoint from before global_batch


@heavy
@pytest.mark.parametrize(
    ("setting", "expected"),
    [("train.distributed=none", "train.distributed=none"), ("train.distributed_backend=nccl", "nccl")],
)
def test_bad_launch_fails_on_every_rank_in_one_line(setting, expected, tiny_models, sentiment_csv, tmp_path):
    import torch

    if "nccl" in setting and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run = tmp_path / "run"
    log = tmp_path / "bad.log"
    rc = _launch(
        2, [*_overrides(tiny_models["bert"], sentiment_csv, run), setting], log, timeout=90, ok=False
    )
    text = log.read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("leantune: error:")]
    # Each rank reaches the same verdict before any collective; torchrun stops the others (SIGTERM) as
    # soon as the first exits, so a slower rank may be stopped before it prints its own line.
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", text)
    assert rc != 0 and lines and all(ln == lines[0] and expected in ln for ln in lines), text[-3000:]
    assert "2" in codes and set(codes) <= {"2", "-15"}, text[-3000:]
    assert not re.search(r"\[rank\d\]: Traceback", text), text[-3000:]  # torchrun's own report has one
    assert not run.exists()


def test_export_of_an_fsdp_checkpoint_joins_the_shards(full_runs, tmp_path):
    """`leantune export --checkpoint` on DCP shards gives the weights the 1-process run checkpointed."""
    from safetensors.torch import load_file

    from leantune.cli import main

    fsdp, single = full_runs
    assert main(["export", str(fsdp), "--checkpoint", str(RESUME_FROM), "--out", str(tmp_path / "x")]) == 0
    got = load_file(str(tmp_path / "x" / "model.safetensors"))
    want = load_file(str(single / "checkpoints" / f"step-{RESUME_FROM:08d}" / "trainable.safetensors"))
    assert set(want) <= set(got)
    assert max(float((got[k] - want[k]).abs().max()) for k in want) < 1e-5


def test_the_lost_rank_line_names_the_rank_and_the_checkpoint(tmp_path):
    from leantune.train import checkpoint as ckpt
    from leantune.train.distributed import _lost_message, _Terminated

    root = tmp_path / "checkpoints"
    line = _lost_message(0, [1], [], RuntimeError("Connection closed by peer"), root)
    assert line.startswith("rank 1 of this run was lost") and "no complete checkpoint yet" in line
    (root / "step-00000005").mkdir(parents=True)
    (root / "step-00000005" / ckpt.MANIFEST).write_text("{}")
    (root / "latest").write_text("step-00000005")
    line = _lost_message(1, [], [0], RuntimeError(), root)
    assert "rank 0 stopped on an error of its own" in line and "step-00000005" in line and "--resume" in line
    assert "SIGTERM" in _lost_message(1, [], [], _Terminated(), None)


# -- a refusal at rank 0's first write reaches every rank ----------------------------------------------
_RACE = '''
"""`leantune train` where another leantune run takes the run folder's lock between the checks every
rank makes and rank 0's first write (the race the lock re-check exists for): rank 0 refuses there."""
import fcntl, os, sys
from leantune import runfolder
from leantune.cli import main

real = runfolder.RunFolder.acquire

def taken_first(self):
    self.out.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.out / runfolder.LOCK, os.O_RDWR | os.O_CREAT, 0o644)  # the other run's lock
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"4242\\n")
    return real(self)

if os.environ.get("RANK") == "0":
    runfolder.RunFolder.acquire = taken_first
sys.exit(main(["train", *sys.argv[1:]]))
'''


@pytest.mark.parametrize("mode", ["ddp", pytest.param("fsdp", marks=[pytest.mark.slow, heavy])])
def test_refusal_at_the_first_write_stops_every_rank_at_once(mode, tiny_models, sentiment_csv, tmp_path):
    """Rank 0 alone sees the refusal; every rank must print the same line and exit 2 within seconds,
    not wait at a barrier until train.distributed_timeout_s (here 300 s), nor end with a lost-rank line
    (exit 1), which is what rank 1 did before rank 0 broadcast its verdict (`main_decides`). About 10 s
    for the ddp launch here (imports and the tiny model's load are most of it); fsdp is the same path."""
    script = tmp_path / "race.py"
    script.write_text(_RACE)
    run, logs = tmp_path / "run", tmp_path / "logs"
    args = [
        *_overrides(tiny_models["bert"], sentiment_csv, run),
        f"train.distributed={mode}",
        "train.distributed_timeout_s=300",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["--log-dir", str(logs), "--redirects", "3", str(script), *args]
    start = time.monotonic()
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=280)
    took = time.monotonic() - start
    text = done.stdout + done.stderr
    per_rank = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
    assert sorted(per_rank) == [0, 1], text[-3000:]
    lines = {
        r: [ln for ln in t.splitlines() if ln.startswith("leantune: error:")] for r, t in per_rank.items()
    }
    assert all(len(v) == 1 for v in lines.values()), per_rank
    assert lines[0] == lines[1] and "in use by leantune pid 4242" in lines[0][0], lines
    assert not any("Traceback" in t for t in per_rank.values()), per_rank
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", text)
    assert done.returncode != 0 and codes and set(codes) == {"2"}, text[-3000:]
    print(f"{mode}: every rank refused in one line, exit 2, {took:.1f} s for the whole launch")
    assert took < 150  # a waiting rank would take the 300 s timeout; a loaded 2-core machine takes ~35 s


# -- leantune plan --world-size against the measured per-rank peaks --------------------------------------
@pytest.fixture(scope="module")
def small_bert(tmp_path_factory) -> Path:
    """A BERT of 11M parameters (44 MB), no dropout: the tiny one (4 MB) is below the RSS noise of a
    process (kernels paged in, Python objects), which would decide a 15% check on its own."""
    import torch
    import transformers

    from leantune.models.loader import load_tokenizer

    tok = load_tokenizer("embedded:minilm")
    cfg = transformers.BertConfig(
        vocab_size=len(tok),
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    dest = tmp_path_factory.mktemp("small") / "bert"
    transformers.BertForSequenceClassification(cfg).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def _plan_args(model: Path, data: Path, method: str) -> list[str]:
    return [
        f"model.name={model}",
        "model.max_length=32",
        f"data.source={data}",
        "data.max_train_samples=64",
        f"methods=[{method}]",
        "train.num_threads=1",
    ]


@pytest.mark.slow  # one 2-process launch: ~20 s alone, a minute on a loaded 2-core machine
@heavy
@pytest.mark.parametrize("method", ["full", "lora"])
def test_plan_predicts_the_per_rank_peak(method, small_bert, sentiment_csv, tmp_path, capsys):
    """`leantune plan --world-size 2` under FSDP within 15% of each rank's measured peak (RSS growth
    since the model started loading, less the libraries' code pages; glibc returning freed memory, as
    the memory model is validated). Full fine-tuning peaks at the end of backward, LoRA at the root's
    all-gather: the two ends of the model. Measured here: full 183 MiB vs 176 predicted, LoRA 126 vs 128."""
    from leantune.cli import main

    args = _plan_args(small_bert, sentiment_csv, method)
    assert main(["plan", *args, "train.batch_size=4", "train.distributed=fsdp", "--world-size", "2"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("per-process peak"))
    predicted = int(re.search(r"\((\d+) bytes\)", line).group(1))
    run = tmp_path / "run"
    train = [
        *args,
        "train.batch_size=4",
        "train.max_steps=3",
        "train.save_every=null",
        "train.eval_every=null",
    ]
    train += ["output.tensorboard=false", f"output.dir={run}", "train.distributed=fsdp"]
    env = {**_env(), "MALLOC_MMAP_THRESHOLD_": "131072"}
    with (tmp_path / "log").open("w") as fh:
        rc = subprocess.run(
            _cmd(2, train), env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=300
        ).returncode
    assert rc == 0, (tmp_path / "log").read_text()[-3000:]
    measured = json.loads((run / "summary.json").read_text())["memory"]["model_peak_bytes_per_rank"]
    assert len(measured) == 2
    for peak in measured:
        print(f"{method}: predicted {predicted / 2**20:.1f} MiB, measured {peak / 2**20:.1f} MiB")
        assert abs(predicted - peak) / peak < 0.15, (predicted, measured)


@pytest.fixture(scope="module")
def small_tied_llama(tmp_path_factory) -> Path:
    """The tied-embedding Llama of models/tiny.py at width 256 and 4 blocks (41 MB, 31 MB of it the
    tied embedding/head): large enough to rise above a process's RSS noise, tied as SmolLM2 is."""
    from leantune.models.tiny import build_tiny_model

    return build_tiny_model(
        "llama_tied", tmp_path_factory.mktemp("small") / "llama_tied", hidden=256, layers=4
    )


@pytest.mark.slow  # a plan and a training run of a 41 MB model: ~40 s alone, minutes on a loaded machine
@heavy
@pytest.mark.parametrize(
    ("processes", "method", "extra", "phase"),
    [
        (1, "lora", [], "eval"),  # 32 evaluation rows x 30,522 logits, twice, outweigh a LoRA step
        (2, "full", ["data.max_eval_samples=4"], "backward_end"),  # the tied weight's two gradients
    ],
)
def test_plan_predicts_a_tied_causal_lm(
    processes, method, extra, phase, small_tied_llama, sentiment_csv, tmp_path, capsys
):
    """`leantune plan --world-size N` within 15% of each rank's measured peak for a causal LM whose head
    is its input embedding, on one process (LoRA: the evaluation pass sets the peak) and on two FSDP
    processes (full: the end of backward, where the tied weight's second whole gradient meets the
    root's gathered weights and first gradient)."""
    from leantune.cli import main

    args = [*_plan_args(small_tied_llama, sentiment_csv, method), "task=causal_lm", *extra]
    mode = ["train.distributed=fsdp"] if processes > 1 else []
    assert main(["plan", *args, "train.batch_size=4", *mode, "--world-size", str(processes)]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("per-process peak"))
    predicted = int(re.search(r"\((\d+) bytes\)", line).group(1))
    assert f"at {phase.replace('_', ' ')}" in line, out
    run = tmp_path / "run"
    train = [*args, "train.batch_size=4", "train.max_steps=3", "train.save_every=null", *mode]
    train += ["output.tensorboard=false", f"output.dir={run}"]
    env = {**_env(), "MALLOC_MMAP_THRESHOLD_": "131072"}
    with (tmp_path / "log").open("w") as fh:
        rc = subprocess.run(
            _cmd(processes, train), env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=600
        ).returncode
    assert rc == 0, (tmp_path / "log").read_text()[-3000:]
    memory = json.loads((run / "summary.json").read_text())["memory"]
    measured = memory["model_peak_bytes_per_rank"]
    assert len(measured) == processes
    if phase == "eval":  # rank 0's own record: its peak came after the steps
        assert memory["peak_phase"] == "outside_steps", memory
    for peak in measured:
        print(
            f"{processes} x {method}: predicted {predicted / 2**20:.1f} MiB, measured {peak / 2**20:.1f} MiB"
        )
        assert abs(predicted - peak) / peak < 0.15, (predicted, measured)


def test_rank_memory_shards_what_fsdp_shards_and_ddp_replicates(tiny_models):
    """The arithmetic of the per-rank model on the tiny BERT: FSDP's shards are the padded dim-0
    chunks (so 2 ranks hold at least half, never less), DDP adds one flat copy of the gradients."""
    import torch

    from leantune.memory.estimate import estimate_memory
    from leantune.memory.sharding import rank_memory, shard_bytes
    from leantune.models.loader import load_model

    model = load_model(str(tiny_models["bert"]), "classification", "float32", ["neg", "pos"], 0)
    est = estimate_memory(model, "classification", 4, 16)
    one, ddp = rank_memory(model, est, 1, "none"), rank_memory(model, est, 2, "ddp")
    fsdp2, fsdp3 = rank_memory(model, est, 2, "fsdp"), rank_memory(model, est, 3, "fsdp")
    full = sum(p.numel() * 4 for p in model.parameters())
    assert one.weights == ddp.weights == full and one.gradients == ddp.gradients == full
    assert ddp.ddp_buckets == full and one.ddp_buckets == 0 and ddp.total > one.total
    assert full / 2 <= fsdp2.weights < full / 2 + 4 * 1024  # padding: at most a row per tensor
    assert fsdp2.optimizer_state == 2 * fsdp2.gradients + 4 * len(list(model.parameters()))
    assert shard_bytes(torch.zeros(7, 3), 2) == 4 * 3 * 4 and shard_bytes(torch.zeros(7, 3), 3) == 3 * 3 * 4
    assert fsdp3.weights < fsdp2.weights < one.weights
    assert fsdp2.training < one.training  # full fine-tuning: the sharded state outweighs the gathered root
    if not torch.cuda.is_available():  # on CPU: FSDP2 and gloo state on top of the runtime
        assert fsdp2.runtime > one.runtime > 0
