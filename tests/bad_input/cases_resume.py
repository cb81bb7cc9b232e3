"""`train --resume` refused: nothing to resume, a changed config or dataset, a deleted config.yaml, only
damaged checkpoints, a `latest` pointer leading out of the run. Each case first trains a real 2-step run
with a checkpoint after every step in the case folder, then breaks one thing; the refusal must leave the
run folder exactly as it was."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from tests.bad_input.harness import BASE, Case, Env, expand, train, with_data

SAVING = ("train.save_every=1", "train.keep_checkpoints=5")  # in the cases' argv too: same config


def _trained(env: Env, saving: tuple[str, ...] = SAVING) -> Path:
    from leantune.cli import main

    assert main(["train", *expand(BASE, env.models), *saving]) == 0
    run = env.root / "run"
    (run / "summary.json").unlink()  # as if killed after its last checkpoint
    return run


def _lora_sp_init(env: Env) -> None:
    """A LoRA-SP run whose masked entries kept peft's init (the only behaviour before the option)."""
    _trained(env, (*SAVING, "methods=[{name: lora_sp, frozen_entries: init}]"))


def _never_saved(env: Env) -> None:
    _trained(env, ("train.keep_checkpoints=5",))


def _then(change: Callable[[Path], None]) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        change(_trained(env))

    return setup


def _checkpoints(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("step-*"))


def _corrupt_all(name: str) -> Callable[[Path], None]:
    def change(run: Path) -> None:
        for step in _checkpoints(run):
            data = bytearray((step / name).read_bytes())
            data[len(data) // 2] ^= 0xFF
            (step / name).write_bytes(bytes(data))

    return change


def _delete_all(name: str) -> Callable[[Path], None]:
    def change(run: Path) -> None:
        for step in _checkpoints(run):
            (step / name).unlink()

    return change


def _data(edit: Callable[[str], str]) -> Callable[[Path], None]:
    def change(run: Path) -> None:
        data = run.parent / "data.csv"
        data.write_text(edit(data.read_text()))

    return change


def _swap_first_label(text: str) -> str:
    head, first, *rest = text.splitlines(keepends=True)
    flipped = first.replace(",pos", ",NEG").replace(",neg", ",pos").replace(",NEG", ",neg")
    return "".join([head, flipped, *rest])


def _pointer(value: str) -> Callable[[Path], None]:
    def change(run: Path) -> None:
        for step in _checkpoints(run):  # only the pointer is left to go by
            shutil.rmtree(step)
        (run / "checkpoints" / "latest").write_text(value)

    return change


def _unlink(name: str) -> Callable[[Path], None]:
    return lambda run: (run / name).unlink()


def _state(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def change(run: Path) -> None:
        for step in _checkpoints(run):
            path = step / "trainer_state.json"
            state = json.loads(path.read_text())
            edit(state)
            path.write_text(json.dumps(state))

    return change


# id, what, extra argv, change to the trained run (None: no run at all), phrase
RESUME = [
    ("no-folder", "--resume where no run exists", (), None, "nothing to resume"),
    (
        "no-checkpoint",
        "--resume of a run that never wrote a checkpoint",
        ("train.save_every=null",),
        _never_saved,
        "no intact checkpoint",
    ),
    ("changed-lr", "a changed learning rate", ("train.lr=0.5",), _then(lambda r: None), "train.lr: "),
    ("changed-seed", "a changed seed", ("train.seed=7",), _then(lambda r: None), "train.seed: 0 -> 7"),
    (
        "changed-rank",
        "a changed LoRA rank",
        ("methods=[{name: lora, r: 2}]",),
        _then(lambda r: None),
        "methods.0.r: 8 -> 2",
    ),
    ("changed-method", "another method", ("methods=[full]",), _then(lambda r: None), "methods.0.name"),
    (
        "lora-sp-init-as-zero",
        "a LoRA-SP run with masked entries at init resumed under the default, zero",
        ("methods=[{name: lora_sp}]",),
        _lora_sp_init,
        "methods.0.frozen_entries: init -> zero",
    ),
    (
        "changed-length",
        "a changed max_length",
        ("model.max_length=12",),
        _then(lambda r: None),
        "model.max_length: 16 -> 12",
    ),
    (
        "config-deleted",
        "config.yaml deleted from the run",
        (),
        _then(_unlink("config.yaml")),
        "config.yaml is missing",
    ),
    (
        "data-appended",
        "a row appended to the dataset",
        (),
        _then(_data(lambda t: t + "one more row,pos\n")),
        "data bytes: ",
    ),
    (
        "data-dropped",
        "the last row removed from the dataset",
        (),
        _then(_data(lambda t: "".join(t.splitlines(keepends=True)[:-1]))),
        "data rows.",
    ),
    (
        "data-edited",
        "one label flipped in place, same size",
        (),
        _then(_data(_swap_first_label)),
        "data sha256_first_mib: ",
    ),
    (
        "all-weights-damaged",
        "every checkpoint's weights damaged",
        (),
        _then(_corrupt_all("trainable.safetensors")),
        "no intact checkpoint",
    ),
    (
        "all-optimizer-damaged",
        "every checkpoint's optimizer state damaged",
        (),
        _then(_corrupt_all("optimizer.safetensors")),
        "optimizer.safetensors does not match",
    ),
    (
        "all-rng-missing",
        "every checkpoint's RNG state deleted",
        (),
        _then(_delete_all("rng.safetensors")),
        "rng.safetensors is missing",
    ),
    (
        "all-manifests-damaged",
        "every checkpoint's manifest unreadable",
        (),
        _then(_corrupt_all("manifest.json")),
        "no intact checkpoint",
    ),
    (
        "state-edited",
        "trainer_state.json edited by hand",
        (),
        _then(_state(lambda s: s.update(step=999))),
        "trainer_state.json does not match",
    ),
    (
        "pointer-escapes",
        "`latest` names a folder outside the run",
        (),
        _then(_pointer("../../elsewhere")),
        "not a step-N folder",
    ),
    (
        "pointer-absolute",
        "`latest` names an absolute path",
        (),
        _then(_pointer("/etc")),
        "not a step-N folder",
    ),
    (
        "pointer-missing-target",
        "`latest` names a checkpoint that is gone",
        (),
        _then(_pointer("step-00000002")),
        "is missing",
    ),
    (
        "force-without-resume",
        "--force-resume without --resume",
        ("--force-resume",),
        None,
        "only applies with --resume",
    ),
]


def _cases() -> list[Case]:
    out = []
    for cid, what, extra, setup, phrase in RESUME:
        resume = () if "--force-resume" in extra else ("--resume",)
        out.append(
            Case(
                id=f"resume-{cid}",
                family="resume",
                what=what,
                argv=train(*SAVING, *extra, *resume),
                phrase=phrase,
                files=with_data(),
                setup=setup,
            )
        )
    return out


CASES = _cases()
