"""The same `leantune train` command runs data-parallel: 2 processes on CPU (DDP over gloo) via accelerate.

What a silently broken setup looks like, and what each check rules out:
- `accelerate launch --cpu --num_processes 2` starts ONE process  -> `world_size == 2`;
- two processes that each train alone, without gradient sync    -> both ranks end with identical weights
  (they train on different shards, so without sync they would diverge);
- every rank writing the logs                                    -> no duplicated (step, split) line;
- a "2-rank" run that is really the single-process run           -> different weights and half the steps,
  yet it still learns.
Resuming under DDP must continue exactly, as it does in one process (tests/test_resume.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
pytestmark = pytest.mark.skipif(ACCELERATE is None, reason="the `accelerate` CLI is not installed")

RESUME_FROM = 50  # a checkpoint that is not at a log line: the running loss must travel too


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        ACCELERATE_USE_CPU="true",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(processes: int, args: list[str], log: Path, timeout: float = 240) -> None:
    """`leantune train ARGS` in one process, or under `accelerate launch` with 2 synced CPU processes."""
    if processes == 1:
        cmd = [sys.executable, "-m", "leantune", "train", *args]
    else:
        # --multi_gpu (with ACCELERATE_USE_CPU=true) is what starts N gloo-synced processes on CPU; `--cpu`
        # alone starts one. The other flags only silence accelerate's warnings about unset defaults.
        cmd = [
            ACCELERATE,
            "launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--main_process_port",
            str(_free_port()),
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "leantune",
            "train",
            *args,
        ]
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, env=_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers: a hung DDP run
            proc.wait()
            pytest.fail(f"{' '.join(cmd[:4])} hung for {timeout} s:\n{log.read_text()[-3000:]}")
    assert rc == 0, log.read_text()[-3000:]


def _overrides(tiny_models, sentiment_csv, run_dir: Path) -> list[str]:
    return [
        f"model.name={tiny_models['bert']}",
        "model.max_length=16",
        f"data.source={sentiment_csv}",
        "methods=[full]",
        "train.batch_size=4",  # per process: 2 ranks x 4 is the 1-process run's batch of 8
        "train.grad_accum=2",  # no_sync on the first micro-batch of each group
        "train.lr=2e-3",
        "train.epochs=6",
        "train.num_threads=1",
        "train.save_every=5",
        "train.keep_checkpoints=100",  # the resume test restarts from a middle one
        "train.log_every=3",
        "train.eval_every=7",  # gathered evaluations between checkpoints, and a best checkpoint to restore
        "output.tensorboard=false",
        f"output.dir={run_dir}",
    ]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def ddp_run(tiny_models, sentiment_csv, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    run_dir = root / "ddp-reference"
    _launch(2, _overrides(tiny_models, sentiment_csv, run_dir), root / "ddp-reference.log")
    return run_dir


def test_two_processes_sync_gradients_and_log_once(ddp_run, tiny_models, sentiment_csv, tmp_path):
    single_dir = tmp_path / "single"
    _launch(1, _overrides(tiny_models, sentiment_csv, single_dir), tmp_path / "single.log")
    ddp, single = _summary(ddp_run), _summary(single_dir)

    assert ddp["world_size"] == 2 and single["world_size"] == 1
    digests = ddp["weights_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1], "the ranks diverged: gradients were not synced"

    records = _records(ddp_run)
    keys = Counter((r["step"], r.get("split", "train")) for r in records)
    assert [k for k, n in keys.items() if n > 1] == [], "more than one rank wrote metrics.jsonl"
    evals = [r for r in records if r.get("split") == "validation"]
    assert evals and all(r["step"] % 7 == 0 or r["step"] % 17 == 0 for r in evals)

    # A genuinely data-parallel run: each rank sees half of every epoch (130 of 259 rows, one repeated to
    # even the shards), so an epoch takes half the optimizer steps and the run ends elsewhere.
    assert ddp["train"]["steps"] == 6 * 17 and single["train"]["steps"] == 6 * 33
    assert ddp["data"] == single["data"]
    assert digests[0] != single["weights_sha256_per_rank"][0]
    assert ddp["test"] != single["test"] or ddp["validation"] != single["validation"]
    # ... and it still learns the toy task.
    losses = [r["loss"] for r in records if "loss" in r and r.get("split") is None]
    assert losses[-1] < 0.8 * losses[0], losses
    for summary in (ddp, single):
        test = summary["test"]
        assert test["accuracy"] >= test["majority_accuracy"] + 0.2, test
    assert ddp["train"]["samples_per_s"] > 0 and ddp["train"]["best_step"] is not None


def test_resume_under_ddp_matches_the_uninterrupted_run(ddp_run, tmp_path):
    """Restart 2 ranks from a middle checkpoint of the reference run: the rest must replay exactly."""
    run_dir = tmp_path / "ddp-resumed"
    shutil.copytree(ddp_run, run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["output"]["dir"] = str(run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    # As if killed right after checkpoint RESUME_FROM: later checkpoints exist but `latest` names that one
    # (the last rename raced the kill), later log lines were written, the run never finished.
    ckpts = run_dir / "checkpoints"
    assert (ckpts / f"step-{RESUME_FROM:08d}").is_dir()
    (ckpts / "latest").write_text(f"step-{RESUME_FROM:08d}")
    for name in ("summary.json", "model"):
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    state = json.loads((ckpts / f"step-{RESUME_FROM:08d}" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["running_n"] > 0

    _launch(2, [str(run_dir / "config.yaml"), "--resume"], tmp_path / "resumed.log")
    got, want = _summary(run_dir), _summary(ddp_run)
    assert got["train"]["resumed"] is True and got["world_size"] == 2
    assert got["weights_sha256_per_rank"] == want["weights_sha256_per_rank"]
    for key in ("steps", "best_step", "best_metric"):
        assert got["train"][key] == want["train"][key], key
    for key, value in want["test"].items():
        assert got["test"][key] == pytest.approx(value, abs=1e-6), key
    a, b = _records(run_dir), _records(ddp_run)
    assert [(r["step"], r.get("split")) for r in a] == [(r["step"], r.get("split")) for r in b]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "lr", "grad_norm", "accuracy"):
            if key in y:
                assert x[key] == pytest.approx(y[key], abs=1e-5), (key, x, y)
