"""Run folders: a run deletes only its own files, holds its folder alone, and resumes only what it wrote.

The refusals of unusable folders (`.`, parents, home, symlinks, foreign files) are rows of the bad-input
suite (tests/bad_input/cases_rundir.py); here are the behaviours that need a real run around them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leantune.config import load_config
from leantune.errors import UserError
from leantune.recipes.train import run_train
from leantune.runfolder import LOCK, MARKER, RunFolder, is_own
from leantune.train import checkpoint as ckpt
from tests.conftest import cli_err, make_sentiment_rows, write_csv


def _run(overrides: list[str], *extra: str, resume: bool = False, force: bool = False) -> dict:
    return run_train(load_config(None, [*overrides, *extra]), resume=resume, force_resume=force)


@pytest.fixture
def short(base_overrides) -> list[str]:
    """Three checkpoints (steps 2, 4, 6) and all kept, so a damaged one has intact ones before it."""
    return [*base_overrides, "train.max_steps=6", "train.save_every=2", "train.keep_checkpoints=10"]


def test_marker_records_the_run_and_the_config_hash(short, tmp_path):
    _run(short)
    run = tmp_path / "run"
    marker = json.loads((run / MARKER).read_text())
    assert marker["config_sha256"] == hashlib.sha256((run / "config.yaml").read_bytes()).hexdigest()
    assert len(marker["run_id"]) == 32 and marker["leantune_version"]
    assert all(is_own(p.name) for p in run.iterdir()), sorted(p.name for p in run.iterdir())


def test_overwrite_replaces_only_leantune_files(short, tmp_path, capsys):
    _run(short)
    run = tmp_path / "run"
    (run / "notes.txt").write_text("mine")
    capsys.readouterr()
    line = cli_err(capsys, "train", *short, "output.overwrite=true")
    assert "did not write (notes.txt)" in line and "never deletes" in line
    assert (run / "notes.txt").read_text() == "mine" and (run / "summary.json").is_file()
    (run / "notes.txt").unlink()
    first = (run / MARKER).read_text()
    _run(short, "output.overwrite=true")
    assert (run / MARKER).read_text() != first  # a new run id


def test_a_second_run_on_a_held_folder_is_refused_with_the_holders_pid(short, tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from leantune.runfolder import RunFolder; "
            "RunFolder(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(60)",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.name for p in run.iterdir())
        line = cli_err(capsys, "train", *short)
        assert f"in use by leantune pid {holder.pid}" in line
        assert sorted(p.name for p in run.iterdir()) == before == [LOCK]
    finally:
        holder.kill()
        holder.wait()
    _run(short)  # the lock died with its holder: the folder is free again
    assert (run / "summary.json").is_file()


def test_the_lock_is_released_when_a_run_ends(short, tmp_path):
    _run(short)
    with RunFolder(tmp_path / "run"):  # would raise if the finished run still held it
        pass


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(short, tmp_path, capsys):
    reference = _run(short, f"output.dir={tmp_path / 'reference'}")
    run = tmp_path / "run"
    _run(short)
    for name in ("summary.json", "model", "best.safetensors"):  # as if killed after the last checkpoint
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    _corrupt(run / "checkpoints" / "step-00000006" / "trainable.safetensors")
    (run / "checkpoints" / "step-00000004" / "rng.safetensors").unlink()
    capsys.readouterr()
    got = _run(short, resume=True)
    err = capsys.readouterr().err
    assert "step-00000006 is damaged (trainable.safetensors does not match its recorded checksum)" in err
    assert "step-00000004 is damaged (rng.safetensors is missing)" in err
    assert "resuming from step-00000002" in err
    assert got["weights_sha256_per_rank"] == reference["weights_sha256_per_rank"]
    assert got["train"]["steps"] == 6


def test_latest_may_only_name_a_step_folder_inside_the_run(tmp_path):
    root = tmp_path / "checkpoints"
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    done = ckpt.save_checkpoint(root, 5, model, opt, {"step": 5}, [ckpt.torch_rng_state()], keep=3)
    outside = tmp_path / "step-00000099"
    shutil.copytree(done, outside)
    for pointer in ("../step-00000099", "/etc", "step-5/../../step-00000099", ""):
        (root / "latest").write_text(pointer)
        path, notes = ckpt.find_checkpoint(root)
        assert path == done, pointer
        assert pointer == "" or any("not a step-N folder" in n for n in notes), notes


def test_only_damaged_checkpoints_leave_nothing_to_resume(short, tmp_path, capsys):
    _run(short)
    run = tmp_path / "run"
    (run / "summary.json").unlink()
    for step in (2, 4, 6):
        _corrupt(run / "checkpoints" / f"step-{step:08d}" / "optimizer.safetensors")
    capsys.readouterr()
    line = cli_err(capsys, "train", *short, "--resume")
    assert "no intact checkpoint" in line and "step-00000002 is damaged" in line


def _own_data_run(base_overrides, tmp_path) -> tuple[list[str], Path]:
    data = write_csv(tmp_path / "own.csv", make_sentiment_rows(200, seed=3))
    return [*base_overrides, f"data.source={data}", "train.max_steps=4", "train.save_every=2"], data


def _as_killed(run: Path) -> None:
    (run / "summary.json").unlink()
    shutil.rmtree(run / "model")


def test_resume_with_a_changed_dataset_is_refused_naming_what_changed(base_overrides, tmp_path, capsys):
    overrides, data = _own_data_run(base_overrides, tmp_path)
    _run(overrides)
    run = tmp_path / "run"
    _as_killed(run)
    with data.open("a") as fh:
        fh.write("an added row,pos\n")
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    capsys.readouterr()
    line = cli_err(capsys, "train", *overrides, "--resume")
    assert "other data or config" in line and "data bytes:" in line and "--force-resume" in line
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before


def test_resume_with_another_config_names_the_key_and_force_resume_records_it(
    base_overrides, tmp_path, capsys
):
    overrides, _ = _own_data_run(base_overrides, tmp_path)
    _run(overrides)
    run = tmp_path / "run"
    _as_killed(run)
    capsys.readouterr()
    line = cli_err(capsys, "train", *overrides, "train.lr=0.01", "--resume")
    assert "train.lr: 0.003 -> 0.01" in line
    got = _run(overrides, "train.lr=0.01", resume=True, force=True)
    assert "no longer one reproducible run" in capsys.readouterr().err
    assert got["train"]["resume_forced_changes"] == ["train.lr: 0.003 -> 0.01"]


def test_resume_without_config_yaml_is_refused(base_overrides, tmp_path, capsys):
    overrides, _ = _own_data_run(base_overrides, tmp_path)
    _run(overrides)
    (tmp_path / "run" / "config.yaml").unlink()
    capsys.readouterr()
    line = cli_err(capsys, "train", *overrides, "--resume")
    assert "config.yaml is missing" in line


def test_force_resume_needs_resume(base_overrides, capsys):
    assert "only applies with --resume" in cli_err(capsys, "train", *base_overrides, "--force-resume")


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    first = ckpt.save_checkpoint(root, 5, model, opt, {"step": 5}, [ckpt.torch_rng_state()], keep=3)
    real = ckpt.save_file

    def fill_disk(tensors, path):
        if path.endswith("optimizer.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(ckpt, "save_file", fill_disk)
    with pytest.raises(
        UserError, match="disk full while writing checkpoint step 10.*step-00000005 is intact"
    ):
        ckpt.save_checkpoint(root, 10, model, opt, {"step": 10}, [ckpt.torch_rng_state()], keep=3)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000005"]
    assert ckpt.find_checkpoint(root) == (first, [])


def test_a_full_disk_during_a_run_is_one_line_and_resumable(short, tmp_path, capsys, monkeypatch):
    real = ckpt.save_file
    calls = {"n": 0}

    def fill_disk_at_second_checkpoint(tensors, path):
        calls["n"] += 1
        if calls["n"] > 4:  # four files a checkpoint: the second one fails
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(ckpt, "save_file", fill_disk_at_second_checkpoint)
    from leantune.cli import main

    assert main(["train", *short]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]  # after the progress bar, which the error closes first
    assert "disk full" in line and "step-00000002 is intact" in line and "--resume" in line
    monkeypatch.setattr(ckpt, "save_file", real)
    assert _run(short, resume=True)["train"]["steps"] == 6


def test_a_full_disk_while_saving_the_model_is_one_line(short, tmp_path, capsys, monkeypatch):
    import leantune.recipes.train as recipe
    from leantune.cli import main

    def full(module, tok, dest, summary, state_dict=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(dest))

    monkeypatch.setattr(recipe, "_save_model", full)
    assert main(["train", *short]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"leantune: error: disk full while writing {tmp_path / 'run' / 'model'}; free space, "
        "then run the same command with --resume"
    )
    monkeypatch.undo()
    assert _run(short, resume=True)["train"]["steps"] == 6
    assert (tmp_path / "run" / "model").is_dir()


def test_atomic_writes_leave_no_temporary_when_they_fail(tmp_path):
    from leantune.atomic import write_folder_atomic, write_text_atomic

    def half_then_fail(folder: Path) -> None:
        folder.mkdir()
        (folder / "part").write_text("x")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        write_folder_atomic(tmp_path / "model", half_then_fail)
    (tmp_path / "keep.json").write_text("old")
    with pytest.raises(TypeError):
        write_text_atomic(tmp_path / "keep.json", None)  # fails mid-write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json"]
    assert (tmp_path / "keep.json").read_text() == "old"


def test_a_run_that_finished_in_the_folder_while_this_one_loaded_is_kept(short, tmp_path, monkeypatch):
    """The folder is checked again under the lock, right before the first write: a run that started on an
    empty folder must not clear another run that finished there meanwhile (no overwrite asked)."""
    import leantune.recipes.train as recipe

    real_prepare = recipe.prepare
    run = tmp_path / "run"

    def prepare_while_another_run_finishes(*args, **kwargs):
        prep = real_prepare(*args, **kwargs)  # checked: the folder did not exist yet
        run.mkdir(parents=True)
        RunFolder(run).write_marker("0" * 64, "0.0")
        (run / "summary.json").write_text('{"theirs": true}')
        return prep

    monkeypatch.setattr(recipe, "prepare", prepare_while_another_run_finishes)
    with pytest.raises(UserError, match="already holds a run"):
        _run(short)
    assert (run / "summary.json").read_text() == '{"theirs": true}'


def test_only_leantunes_own_temporaries_count_as_its_files():
    assert is_own(".summary.json.0123456789ab.tmp") and is_own(".config.yaml.a1b2c3d4e5f6.tmp")
    assert not is_own(".notes.tmp") and not is_own(".draft.backup.tmp") and not is_own("notes.tmp")


def test_a_killed_run_that_saved_best_weights_is_not_a_failed_start(tmp_path, capsys, short):
    """No checkpoint (save_every: null) and no summary, but trained weights: a plain start must not clear
    it; only output.overwrite=true may."""
    run = tmp_path / "run"
    run.mkdir()
    RunFolder(run).write_marker("0" * 64, "0.0")
    (run / "best.safetensors").write_bytes(b"weights")
    line = cli_err(capsys, "train", *short)
    assert "already holds a run" in line and (run / "best.safetensors").read_bytes() == b"weights"


def test_a_malformed_manifest_means_a_damaged_checkpoint(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    root = tmp_path / "checkpoints"
    done = ckpt.save_checkpoint(root, 5, model, opt, {"step": 5}, [ckpt.torch_rng_state()], keep=3)
    for bad in ("[1, 2]", '{"trainable.safetensors": {"sha256": "x"}}', '{"trainable.safetensors": 3}'):
        (done / "manifest.json").write_text(bad)
        assert ckpt.checkpoint_damage(done) == "manifest.json is malformed", bad


def test_saved_configs_of_8bit_quant_and_mezo_runs_load_and_pass_their_checks(tmp_path):
    """A run's config.yaml sets every key to its value; defaults a method ignores must not refuse it
    (found in review: `--resume` with the saved config of an 8-bit quant or a mezo run was refused)."""
    from leantune.config import dump_config
    from leantune.methods._own_step import check_train_options

    for methods in ("[{name: quant, bits: 8}, lora]", "[mezo]"):
        saved = tmp_path / "config.yaml"
        saved.write_text(dump_config(load_config(None, [f"methods={methods}"])))
        cfg = load_config(saved)
        check_train_options(cfg, 1, "mezo", {"max_grad_norm": None, "adamw_impl": "auto"})


def test_outputs_are_never_written_over_a_file_that_appeared_meanwhile(tmp_path):
    """export's folder and generate/predict's --out are checked up front and again at the final rename:
    what appeared in between is kept and the command fails (found in review)."""
    from leantune.atomic import write_folder_atomic, write_new_text

    dest = tmp_path / "exported"

    def meanwhile(folder: Path) -> None:
        folder.mkdir()
        (folder / "weights").write_text("new")
        dest.mkdir()
        (dest / "theirs").write_text("keep")

    with pytest.raises(FileExistsError):
        write_folder_atomic(dest, meanwhile, replace=False)
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == ["exported"] and (dest / "theirs").read_text() == "keep"
    )
    out = tmp_path / "gen.jsonl"
    out.write_text("theirs")
    with pytest.raises(FileExistsError):
        write_new_text(out, "ours")
    assert out.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == [
        "exported",
        "gen.jsonl",
    ]
    write_folder_atomic(dest, lambda f: (f.mkdir(), (f / "x").write_text("1")))  # replace=True: ours
    assert sorted(p.name for p in dest.iterdir()) == ["x"]


@pytest.mark.parametrize(
    "extra",
    [
        ["methods=[lomo]", "train.grad_accum=2"],
        ["methods=[mezo]", "train.nan_policy=skip"],
        ["methods=[mezo]", "train.adamw_impl=fused"],
    ],
)
def test_a_method_refusing_the_run_settings_costs_no_earlier_run(short, tmp_path, capsys, extra):
    """Methods check the run's settings before the first write: with output.overwrite=true a refusal
    used to come after the earlier run was cleared (found in review)."""
    _run(short)
    run = tmp_path / "run"
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    capsys.readouterr()
    cli_err(capsys, "train", *short, *extra, "output.overwrite=true")
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
