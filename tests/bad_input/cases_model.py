"""Local model folders that cannot be used: no tokenizer, an empty/invalid/missing config.json,
truncated or corrupt safetensors, only pickled weights (never unpickled), no weights, a missing shard.
Each for classification `train`, causal-LM `train` and `plan`."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable

from tests.bad_input.harness import Case, Env, train, with_data


def _damage(arch: str, edit: Callable) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        folder = env.copy_model(arch, "model")
        edit(folder)

    return setup


def _rm(*names: str):
    def edit(folder):
        for name in names:
            (folder / name).unlink()

    return edit


def _write(name: str, content: str | bytes, remove: tuple[str, ...] = ()):
    def edit(folder):
        for r in remove:
            (folder / r).unlink()
        path = folder / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)

    return edit


def _truncate(keep: int | float):
    def edit(folder):
        path = folder / "model.safetensors"
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])

    return edit


def _bad_header(folder):
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 5) + b"xxxxx" + b"\0" * 64)


def _missing_shard(folder):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _empty_folder(folder):
    for f in folder.iterdir():
        f.unlink()


# id, what, edit, phrase
DEFECTS = [
    (
        "no-tokenizer",
        "no tokenizer files",
        _rm("tokenizer.json", "tokenizer_config.json"),
        "has no tokenizer",
    ),
    ("config-empty-object", "config.json is {}", _write("config.json", "{}"), "no 'model_type'"),
    ("config-list", "config.json is a list", _write("config.json", "[]"), "no 'model_type'"),
    (
        "config-invalid",
        "config.json is not JSON",
        _write("config.json", '{"model_type": '),
        "config.json is not valid JSON",
    ),
    (
        "config-binary",
        "config.json is binary",
        _write("config.json", b"\x89PNG\r\n\x1a\n\0\0"),
        "config.json is not valid JSON",
    ),
    ("no-config", "no config.json", _rm("config.json"), "has no config.json"),
    ("truncated-half", "model.safetensors cut in half", _truncate(0.5), "model.safetensors is truncated"),
    (
        "truncated-header",
        "model.safetensors cut inside its header",
        _truncate(100),
        "model.safetensors is truncated",
    ),
    ("truncated-4-bytes", "model.safetensors of 4 bytes", _truncate(4), "model.safetensors is truncated"),
    ("weights-empty", "an empty model.safetensors", _truncate(0), "model.safetensors is truncated"),
    (
        "weights-bad-header",
        "model.safetensors with a garbage header",
        _bad_header,
        "is not a valid safetensors file",
    ),
    (
        "only-pytorch-bin",
        "only pytorch_model.bin (a pickle)",
        _write("pytorch_model.bin", b"PK\x03\x04 pickle", ("model.safetensors",)),
        "only pickled PyTorch weights (pytorch_model.bin)",
    ),
    (
        "only-sharded-bin",
        "only sharded pytorch_model-*.bin",
        _write("pytorch_model-00001-of-00002.bin", b"PK\x03\x04", ("model.safetensors",)),
        "only pickled PyTorch weights",
    ),
    ("no-weights", "no weights at all", _rm("model.safetensors"), "holds no weights"),
    (
        "missing-shard",
        "an index naming a missing shard",
        _missing_shard,
        "model-00002-of-00002.safetensors named in",
    ),
    ("empty-folder", "an empty folder", _empty_folder, "has no config.json"),
]

CAUSAL = ("task=causal_lm", "data.label_column=null")


def _cases() -> list[Case]:
    out = []
    for cid, what, edit, phrase in DEFECTS:
        variants = [
            ("train", "bert", train("model.name=model")),
            ("train-causal", "gpt2", train(*CAUSAL, "model.name=model")),
            ("plan", "bert", ("plan", "@BASE@", "model.name=model", "--memory-budget", "1GiB")),
        ]
        for vid, arch, argv in variants:
            out.append(
                Case(
                    id=f"{vid}-{cid}",
                    family="model",
                    what=f"model folder: {what}",
                    argv=argv,
                    phrase=phrase,
                    files=with_data(),
                    setup=_damage(arch, edit),
                )
            )
    out.append(
        Case(
            id="train-model-is-a-file",
            family="model",
            what="model.name is a weights file, not a folder",
            argv=train("model.name=weights.safetensors"),
            phrase="is a file; point it at the model's folder",
            files=with_data({"weights.safetensors": b"\0" * 16}),
        )
    )
    out.append(
        Case(
            id="train-prompt-past-positions",
            family="model",
            what="a soft prompt that, with model.max_length, exceeds the model's positions",
            argv=train("methods=[{name: prompt, num_virtual_tokens: 120}]"),
            phrase="+ 120 virtual tokens (methods.0 prompt) = 136 exceeds the 128 positions",
            files=with_data(),
        )
    )
    out.append(
        Case(
            id="train-model-missing",
            family="model",
            what="model.name is a path that does not exist",
            argv=train("model.name=./no-model"),
            phrase="model path not found",
            files=with_data(),
        )
    )
    return out


CASES = _cases()
