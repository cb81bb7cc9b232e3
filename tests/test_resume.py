"""`leantune train --resume` after a kill continues exactly where the run stopped.

The end-to-end test SIGKILLs a real `leantune train` process at an arbitrary moment (mid-step,
mid-evaluation or mid-checkpoint), resumes it, and checks that the result is bit-for-bit the run that
was never interrupted: the same final weights, the same test metrics, and the same `metrics.jsonl`
(no duplicated or missing lines). LoRA dropout makes the RNG state matter, gradient accumulation with an
uneven last group makes the data position matter, and evaluations between checkpoints make the
best-so-far bookkeeping matter.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from leantune.train import checkpoint as ckpt
from tests.conftest import FULL

KILL_AT_STEP = 120  # of 330; checkpoints every 5 steps, evaluations every 7 and at each epoch's end


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"
    )
    return env


def _train_cmd(tiny_models, sentiment_csv, run_dir: Path, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "leantune",
        "train",
        f"model.name={tiny_models['bert']}",
        "model.max_length=16",
        f"data.source={sentiment_csv}",
        "methods=[{name: lora, r: 4, dropout: 0.2}]",
        "train.batch_size=4",  # 259 training rows: 65 micro-batches, so the last group of each epoch is 1
        "train.grad_accum=2",
        "train.lr=3e-3",
        "train.epochs=10",  # 33 optimizer steps per epoch, 330 in all
        "train.num_threads=1",
        "train.save_every=5",
        "train.keep_checkpoints=2",
        "train.log_every=3",
        "train.eval_every=7",
        "output.tensorboard=false",
        f"output.dir={run_dir}",
        *flags,
    ]


def _latest_step(run_dir: Path) -> int:
    pointer = run_dir / "checkpoints" / "latest"
    try:
        return int(pointer.read_text().strip().removeprefix("step-"))
    except (FileNotFoundError, ValueError):
        return -1


def _logged_past_checkpoint(run_dir: Path, min_step: int) -> bool:
    step = _latest_step(run_dir)
    if step < min_step:
        return False
    try:
        last = (run_dir / "metrics.jsonl").read_text().splitlines()[-1]
        return json.loads(last)["step"] > step
    except (FileNotFoundError, IndexError, ValueError, KeyError):  # a line being written
        return False


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_log(got: list[dict], want: list[dict]) -> None:
    keys = [(r["step"], r.get("split", "train")) for r in got]
    assert len(keys) == len(set(keys)), "duplicated log lines after resume"
    assert keys == [(r["step"], r.get("split", "train")) for r in want], "log lines missing or out of order"
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys(), (a, b)
        for key, value in b.items():
            if key in ("samples_per_s", "train_time_s"):  # wall-clock throughput and time
                continue
            if isinstance(value, float):
                assert a[key] == pytest.approx(value, abs=1e-5), (key, a, b)
            else:
                assert a[key] == value, (key, a, b)


def test_resume_after_kill_matches_uninterrupted_run(tiny_models, sentiment_csv, tmp_path):
    interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in ("interrupted", "reference", "resumed")}
    # The reference and the run to be killed share the 2 cores (one thread each).
    ref_proc = subprocess.Popen(
        _train_cmd(tiny_models, sentiment_csv, reference),
        env=_env(),
        stdout=logs["reference"],
        stderr=subprocess.STDOUT,
    )
    proc = subprocess.Popen(
        _train_cmd(tiny_models, sentiment_csv, interrupted),
        env=_env(),
        stdout=logs["interrupted"],
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        # Kill once lines were logged after the latest checkpoint, so that resuming must drop them.
        while not _logged_past_checkpoint(interrupted, KILL_AT_STEP):
            assert proc.poll() is None, (tmp_path / "interrupted.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the kill step"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert ref_proc.wait(timeout=180) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    finally:
        for p in (proc, ref_proc):
            if p.poll() is None:
                p.kill()
                p.wait()
    killed_at = _latest_step(interrupted)
    assert KILL_AT_STEP <= killed_at < 330
    assert not (interrupted / "summary.json").exists(), "the run finished before it was killed"
    assert not (interrupted / "model").exists()

    resumed = subprocess.run(
        _train_cmd(tiny_models, sentiment_csv, interrupted, "--resume"),
        env=_env(),
        stdout=logs["resumed"],
        stderr=subprocess.STDOUT,
        timeout=180,
    )
    for fh in logs.values():
        fh.close()
    assert resumed.returncode == 0, (tmp_path / "resumed.log").read_text()[-3000:]

    _assert_same_run(interrupted, reference)


def _assert_same_run(interrupted: Path, reference: Path) -> None:
    """The resumed run is the uninterrupted one: summary, test metrics, weights, best weights, log."""
    got = json.loads((interrupted / "summary.json").read_text())
    want = json.loads((reference / "summary.json").read_text())
    assert got["train"]["resumed"] is True and want["train"]["resumed"] is False
    for key in ("steps", "epochs_completed", "best_step", "best_metric", "stopped_early"):
        assert got["train"][key] == want["train"][key], key
    assert got["train"]["steps"] == 330
    assert got["test"].keys() == want["test"].keys()
    for key, value in want["test"].items():
        assert got["test"][key] == pytest.approx(value, abs=1e-6), key
    assert got["weights_sha256_per_rank"] == want["weights_sha256_per_rank"]

    for name in ("model/adapter_model.safetensors", "best.safetensors"):
        a, b = load_file(str(interrupted / name)), load_file(str(reference / name))
        assert a.keys() == b.keys(), name
        for key in b:
            assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), (name, key)

    _assert_same_log(_records(interrupted), _records(reference))


KILLS = 20


def _logged_step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    except (FileNotFoundError, IndexError, ValueError, KeyError):
        return -1


def _kill_once(cmd: list[str], run_dir: Path, target: int, delay: float, log) -> str:
    """Start `cmd`, SIGKILL it `delay` s after its log reaches step `target`; say where it was."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while _logged_step(run_dir) < target and proc.poll() is None:
            assert time.monotonic() < deadline, f"the run never reached step {target}"
            time.sleep(0.002)
        time.sleep(delay)  # lands mid-step, mid-evaluation, mid-checkpoint or during start-up
        if proc.poll() is not None:
            return f"exited {proc.returncode} before the kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        return f"killed at log step {_logged_step(run_dir)}, checkpoint {_latest_step(run_dir)}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(not FULL, reason="20 restarts take ~3 min: runs in CI (CI=true) or LEANTUNE_FULL_TESTS=1")
def test_twenty_random_kills_resume_to_the_uninterrupted_run(tiny_models, sentiment_csv, tmp_path):
    """The kill -9 campaign: one run killed at 20 random moments, each time resumed (or restarted when no
    checkpoint existed yet), ends bit-for-bit as the run that was never interrupted."""
    import random

    rng = random.Random(20261204)
    interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"
    with (tmp_path / "reference.log").open("w") as log:
        done = subprocess.run(
            _train_cmd(tiny_models, sentiment_csv, reference),
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    assert done.returncode == 0, (tmp_path / "reference.log").read_text()[-3000:]
    targets = sorted(rng.sample(range(0, 300), KILLS))
    history = []
    with (tmp_path / "interrupted.log").open("w") as log:
        for target in targets:
            resume = ["--resume"] if _latest_step(interrupted) >= 0 else []
            cmd = _train_cmd(tiny_models, sentiment_csv, interrupted, *resume)
            history.append((target, _kill_once(cmd, interrupted, target, rng.uniform(0, 0.05), log)))
            assert "exited" not in history[-1][1], history
        final = subprocess.run(
            _train_cmd(tiny_models, sentiment_csv, interrupted, "--resume"),
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    assert final.returncode == 0, (history, (tmp_path / "interrupted.log").read_text()[-3000:])
    assert len(history) == KILLS
    _assert_same_run(interrupted, reference)


@pytest.fixture(scope="module")
def finished_run(tiny_models, sentiment_csv, tmp_path_factory) -> Path:
    """An in-process run keeping all its checkpoints: 259 rows / 16 = 17 batches, 9 steps an epoch."""
    from leantune.config import load_config
    from leantune.recipes.train import run_train

    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_train(
        load_config(
            None,
            [
                f"model.name={tiny_models['bert']}",
                "model.max_length=16",
                f"data.source={sentiment_csv}",
                "methods=[{name: lora, r: 4, dropout: 0.2}]",
                "train.batch_size=16",
                "train.grad_accum=2",
                "train.lr=3e-3",
                "train.epochs=3",
                "train.num_threads=1",
                "train.save_every=3",
                "train.keep_checkpoints=100",
                "train.log_every=2",
                "train.eval_every=4",
                "output.tensorboard=false",
                f"output.dir={run_dir}",
            ],
        )
    )
    return run_dir


@pytest.mark.parametrize("from_step", [3, 9, 27], ids=["mid-epoch-between-logs", "epoch-end", "last-step"])
def test_resume_from_any_checkpoint_replays_exactly(finished_run, tmp_path, from_step):
    """As if killed right after checkpoint `from_step` (27 = after the last step, before the summary)."""
    import yaml

    from leantune.config import load_config
    from leantune.recipes.train import run_train

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["output"]["dir"] = str(run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run_dir / "checkpoints" / "latest").write_text(f"step-{from_step:08d}")
    (run_dir / "summary.json").unlink()
    shutil.rmtree(run_dir / "model")

    got = run_train(load_config(run_dir / "config.yaml"), resume=True)
    want = json.loads((finished_run / "summary.json").read_text())
    assert got["train"]["resumed"] is True
    assert got["weights_sha256_per_rank"] == want["weights_sha256_per_rank"]
    for key in ("steps", "epochs_completed", "best_step", "best_metric"):
        assert got["train"][key] == want["train"][key], key
    for key, value in want["test"].items():
        assert got["test"][key] == pytest.approx(value, abs=1e-6), key
    _assert_same_log(_records(run_dir), _records(finished_run))
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))[-1] == "step-00000027"


# -- checkpoint folders: atomic writes and pruning --------------------------------------------------


class _FakeOptimizer:
    def __init__(self, model: torch.nn.Module) -> None:
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def state_dict(self):
        return self.opt.state_dict()

    def load_state_dict(self, state):
        self.opt.load_state_dict(state)


def _save(root: Path, step: int, model, opt, keep: int = 2, world: int = 1) -> Path:
    rngs = [ckpt.torch_rng_state() for _ in range(world)]
    return ckpt.save_checkpoint(root, step, model, opt, {"step": step}, rngs, keep)


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = _FakeOptimizer(model)
    model(torch.randn(4, 3)).sum().backward()
    opt.opt.step()
    return model, opt


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_half_written_checkpoint_is_ignored(tmp_path):
    model, opt = _model_and_optimizer()
    root = tmp_path / "checkpoints"
    assert ckpt.latest_checkpoint(root) is None
    done = _save(root, 5, model, opt)
    # A kill while step 10 was being written leaves only its temporary folder behind.
    partial = root / ".tmp-step-00000010"
    partial.mkdir()
    save_file({"weight": torch.zeros(2, 3)}, str(partial / "trainable.safetensors"))
    (partial / "trainer_state.json").write_text("{")
    assert ckpt.latest_checkpoint(root) == done
    # A kill between the rename and the pointer update: the pointer still names the previous one.
    (root / "step-00000015").mkdir()
    (root / ".latest.tmp").write_text("step-00000015")
    assert ckpt.latest_checkpoint(root) == done
    assert ckpt.load_checkpoint(done, model, opt, rank=0)["step"] == 5
    # The resumed run's next save clears the leftovers: the temp folder and the checkpoint after it.
    again = _save(root, 10, model, opt)
    assert ckpt.latest_checkpoint(root) == again
    assert _names(root) == ["latest", "step-00000005", "step-00000010"]


def test_pointer_to_missing_checkpoint_means_none(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "latest").write_text("step-00000005")
    assert ckpt.latest_checkpoint(root) is None
    (root / "step-00000005").mkdir()  # renamed into place but empty: not a checkpoint
    assert ckpt.latest_checkpoint(root) is None


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keep_checkpoints_prunes_oldest(tmp_path, keep):
    model, opt = _model_and_optimizer()
    root = tmp_path / "checkpoints"
    for step in (5, 10, 15, 20, 25):
        _save(root, step, model, opt, keep)
        names = sorted(p.name for p in root.glob("step-*"))
        assert names[-1] == f"step-{step:08d}"
        assert len(names) <= keep
    want = [f"step-{s:08d}" for s in (5, 10, 15, 20, 25)][-keep:]
    assert _names(root) == ["latest", *want]
    assert ckpt.latest_checkpoint(root) == root / "step-00000025"


def test_checkpoint_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    model, opt = _model_and_optimizer()
    root = tmp_path / "checkpoints"
    torch.manual_seed(123)
    path = _save(root, 7, model, opt)
    want_draw = torch.rand(5)
    want_weights = {k: v.clone() for k, v in model.state_dict().items()}
    want_opt = opt.state_dict()

    other, other_opt = _model_and_optimizer()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    torch.manual_seed(999)
    state = ckpt.load_checkpoint(path, other, other_opt, rank=0)
    assert state == {"step": 7}
    assert torch.equal(torch.rand(5), want_draw)
    for key, value in want_weights.items():
        assert torch.equal(other.state_dict()[key], value)
    got_opt = other_opt.state_dict()
    for idx, slots in want_opt["state"].items():
        for key, value in slots.items():
            assert torch.equal(got_opt["state"][idx][key], value), key


def test_resume_with_another_world_size_is_refused(tmp_path):
    from leantune.errors import UserError

    model, opt = _model_and_optimizer()
    path = _save(tmp_path / "checkpoints", 5, model, opt, world=2)
    with pytest.raises(UserError, match="2 process"):
        ckpt.load_checkpoint(path, model, opt, rank=0, world=1)
    assert ckpt.load_checkpoint(path, model, opt, rank=1, world=2)["step"] == 5


def test_log_truncation_drops_lines_after_the_checkpoint(tmp_path):
    from leantune.train.logging import RunLogger

    log = RunLogger(tmp_path, enabled=True)
    for step in (3, 6, 7, 9, 12):
        log.log({"step": step, "loss": 1.0 / step})
    log.log({"step": 7, "split": "validation", "accuracy": 0.5})
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 15, "lo')  # torn by the kill
    log.truncate_after(10)
    log.log({"step": 12, "loss": 0.5})
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6, 7, 9, 7, 12]
    RunLogger(tmp_path, enabled=False).truncate_after(0)  # other ranks never touch it
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 6
