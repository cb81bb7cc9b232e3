"""Atomic, pickle-free checkpoints: tensors in safetensors, everything else in JSON.

A checkpoint is a folder written under a unique temporary name and renamed into place, then `latest` is
replaced atomically; a kill at any moment leaves either the old or the new checkpoint, never half of
one. Each checkpoint ends with `manifest.json` (size and sha256 of every file), so a checkpoint damaged
later (a bad disk, a hand edit) is recognised, and resume falls back to the newest intact one and says
so. `latest` may only name a `step-N` folder beside it. A full disk while saving removes the partial
checkpoint and keeps the previous one. Nothing is ever `torch.load`ed, so a checkpoint cannot run code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from leantune.atomic import temp_sibling, write_json_atomic, write_text_atomic
from leantune.errors import UserError

MANIFEST = "manifest.json"
STEP_NAME = re.compile(r"step-\d{1,12}")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def save_tensors_atomic(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    tmp = temp_sibling(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    if missing:
        raise RuntimeError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {missing[0]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch's optimizer state dict as safetensors tensors + JSON. A slot may hold a dict of tensors one
    level deep (bitsandbytes keeps its quantisation maps in `__bnb_optimizer_quant_state__`): its tensors
    are stored as `<idx>.<slot>/<key>`."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {"param_groups": state["param_groups"], "state": {}}
    for idx, slots in state["state"].items():
        meta["state"][str(idx)] = {}
        for key, value in slots.items():
            if isinstance(value, dict):
                inner = {}
                for sub, item in value.items():
                    if torch.is_tensor(item):
                        tensors[f"{idx}.{key}/{sub}"] = item
                        inner[sub] = "__tensor__"
                    else:
                        inner[sub] = item
                meta["state"][str(idx)][key] = {"__dict__": inner}
            elif torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
                meta["state"][str(idx)][key] = "__tensor__"
            else:
                meta["state"][str(idx)][key] = value
    return tensors, meta


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each with its own memory: safetensors refuses tensors that share it, and
    bitsandbytes hands every parameter's state the same quantisation map (loaded back as copies)."""
    seen: set[int] = set()
    out = {}
    for key, value in tensors.items():
        value = value.contiguous().cpu()
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


def _join_slot(tensors: dict[str, torch.Tensor], name: str, value):
    if value == "__tensor__":
        return tensors[name]
    if isinstance(value, dict) and "__dict__" in value:
        return {k: _join_slot(tensors, f"{name}/{k}", v) for k, v in value["__dict__"].items()}
    return value


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {
        int(idx): {k: _join_slot(tensors, f"{idx}.{k}", v) for k, v in slots.items()}
        for idx, slots in meta["state"].items()
    }
    return {"state": state, "param_groups": meta["param_groups"]}


def python_rng_state() -> dict:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def restore_python_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def torch_rng_state() -> dict[str, torch.Tensor]:
    """This process's torch generators: CPU, and the current CUDA device's where CUDA is in use."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_torch_rng(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _step_of(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def _sha256(path: Path) -> str:
    """The file's sha256, computed once per (size, mtime, inode) in this process.

    A resume looks at its checkpoint several times (the folder check, the config check, the identity
    check, the load); hashing a multi-GB full fine-tune each time cost minutes. Any rewrite of the file
    (a new inode from an atomic rename, or an edit that changes size or mtime) hashes it again.
    """
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _DIGESTS:
        _DIGESTS[key] = _hash_file(path)
    return _DIGESTS[key]


_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_checkpoint_files(
    tmp: Path,
    model: torch.nn.Module,
    optimizer,
    trainer_state: dict,
    torch_rng: list[dict[str, torch.Tensor] | torch.Tensor],
    method_tensors: list[dict[str, torch.Tensor]] | None,
    save_model: Callable[[Path], None] | None,
) -> None:
    trainable = {k: v.contiguous() for k, v in trainable_state(model).items()}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    opt_tensors, opt_meta = _split_optimizer(optimizer.state_dict())
    save_file(_unshared(opt_tensors), str(tmp / "optimizer.safetensors"))
    _write_run_state(tmp, opt_meta, trainer_state, torch_rng, method_tensors, save_model)


def _write_run_state(
    tmp: Path,
    opt_meta: dict,
    trainer_state: dict,
    torch_rng: list[dict[str, torch.Tensor] | torch.Tensor],
    method_tensors: list[dict[str, torch.Tensor]] | None,
    save_model: Callable[[Path], None] | None,
) -> None:
    """What every checkpoint holds besides the weights and optimizer tensors (whole or sharded): RNG,
    method tensors, optimizer and trainer JSON, the model copy; then the manifest (`_seal`)."""
    rng: dict[str, torch.Tensor] = {}
    for i, r in enumerate(torch_rng):
        for kind, t in ({"cpu": r} if torch.is_tensor(r) else r).items():
            rng[f"rank{i}" if kind == "cpu" else f"rank{i}.{kind}"] = t.cpu()
    save_file(rng, str(tmp / "rng.safetensors"))
    methods = {
        f"{i}.{k}": v.detach().contiguous().cpu()
        for i, tensors in enumerate(method_tensors or [])
        for k, v in tensors.items()
    }
    save_file(methods, str(tmp / "methods.safetensors"))
    write_json_atomic(tmp / "optimizer.json", opt_meta)
    write_json_atomic(
        tmp / "trainer_state.json",
        {**trainer_state, "world_size": len(torch_rng), "python_rng": python_rng_state()},
    )
    if save_model is not None:
        save_model(tmp / "model")
    _seal(tmp)


def _seal(tmp: Path) -> None:
    """Write the manifest (size and sha256 of every file) and flush everything to disk."""
    files = sorted(f for f in tmp.rglob("*") if f.is_file())
    manifest = {str(f.relative_to(tmp)): {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in files}
    write_json_atomic(tmp / MANIFEST, manifest)
    for f in tmp.rglob("*"):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        else:
            _fsync_dir(f)
    _fsync_dir(tmp)


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer,
    trainer_state: dict,
    torch_rng: list[dict[str, torch.Tensor] | torch.Tensor],
    keep: int,
    method_tensors: list[dict[str, torch.Tensor]] | None = None,
    save_model: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint `step` atomically and prune older ones beyond `keep`.

    `torch_rng` holds every rank's generator states (see `torch_rng_state`), in rank order;
    `method_tensors` the tensors of each method's runtime, in config order; `save_model(folder)`, when
    given, writes a loadable copy of the model into the checkpoint's `model/` (a peft adapter: small).
    """
    tmp = _fresh_temp(root, step)
    try:
        _write_checkpoint_files(tmp, model, optimizer, trainer_state, torch_rng, method_tensors, save_model)
    except OSError as exc:
        _refuse_full_disk(exc, root, tmp, step)
    return _publish(root, tmp, step, keep)


def _fresh_temp(root: Path, step: int) -> Path:
    """A new uniquely named temporary folder for checkpoint `step`, after clearing what a kill left."""
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".tmp-step-*"):  # a kill while writing: never a usable checkpoint
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in root.glob(".*.tmp"):  # the same for a pointer being replaced
        leftover.unlink(missing_ok=True)
    tmp = root / f".tmp-step-{step:08d}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _refuse_full_disk(exc: OSError, root: Path, tmp: Path, step: int) -> None:
    """A write of checkpoint `step` failed: remove the partial folder; a full disk is one line naming
    the checkpoint that is still intact, anything else is raised as it was."""
    shutil.rmtree(tmp, ignore_errors=True)
    if exc.errno not in DISK_FULL:
        raise exc
    previous = find_checkpoint(root)[0]
    kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint"
    raise UserError(
        f"disk full while writing checkpoint step {step} in {root}; {kept}: free space, then run the "
        "same command with --resume"
    ) from None


def _publish(root: Path, tmp: Path, step: int, keep: int) -> Path:
    """Rename the sealed temporary folder into `step-N`, point `latest` at it, prune old ones."""
    final = root / f"step-{step:08d}"
    if final.exists():  # left by a kill between the rename and the pointer update; `latest` is older
        shutil.rmtree(final)
    os.rename(tmp, final)
    write_text_atomic(root / "latest", final.name)
    _fsync_dir(root)
    # Keep the newest `keep` up to this step; any later one is a leftover of a killed, resumed run.
    done = sorted(_step_folders(root), key=_step_of)
    older = [p for p in done if _step_of(p) < step]
    stale = [p for p in done if _step_of(p) > step]
    for old in older[: max(0, len(older) - (keep - 1))] + stale:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _step_folders(root: Path) -> list[Path]:
    return [p for p in root.glob("step-*") if p.is_dir() and STEP_NAME.fullmatch(p.name)]


def load_method_tensors(path: Path, count: int) -> list[dict[str, torch.Tensor]]:
    """Each method runtime's checkpointed tensors, in config order (empty for older checkpoints)."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(count)]
    file = path / "methods.safetensors"
    if file.is_file():
        for key, value in load_file(str(file)).items():
            i, name = key.split(".", 1)
            out[int(i)][name] = value
    return out


def checkpoint_damage(path: Path) -> str | None:
    """Why checkpoint `path` cannot be resumed from, or None when it is intact.

    With a manifest every file's size and sha256 must match; a checkpoint from before manifests must at
    least have its files and readable JSON.
    """
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        manifest = None
    except (OSError, ValueError):
        return f"{MANIFEST} is unreadable"
    if manifest is None:
        for name in ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "optimizer.json"):
            if not (path / name).is_file():
                return f"{name} is missing"
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "trainer_state.json is missing or unreadable"
        return None
    try:
        for name, want in manifest.items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != want["bytes"] or _sha256(f) != want["sha256"]:
                return f"{name} does not match its recorded checksum"
    except (AttributeError, KeyError, TypeError):  # a manifest that is not {file: {bytes, sha256}}
        return f"{MANIFEST} is malformed"
    return None


def find_checkpoint(root: Path) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from, and a note for each newer one that was skipped as damaged.

    `latest` names the newest complete checkpoint; it is only trusted to name a `step-N` folder inside
    `root`. A damaged target (or pointer) falls back to the newest intact `step-N` folder.
    """
    pointer = root / "latest"
    try:
        named = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        named = None
    notes: list[str] = []
    candidates = sorted(_step_folders(root), key=_step_of, reverse=True) if root.is_dir() else []
    if named is not None and not STEP_NAME.fullmatch(named):
        notes.append(f"{pointer} names {named[:60]!r}, not a step-N folder: ignored")
        named = None
    if named is not None:  # never resume from past the pointer: a later folder is a killed run's leftover
        limit = _step_of(Path(named))
        candidates = [p for p in candidates if _step_of(p) <= limit]
        if not (root / named).is_dir():
            notes.append(f"checkpoint {named} (named by {pointer}) is missing")
    elif candidates and not pointer.exists():
        notes.append(f"{pointer} is missing")
    for path in candidates:
        damage = checkpoint_damage(path)
        if damage is None:
            return path, notes
        notes.append(f"checkpoint {path.name} is damaged ({damage})")
    return None, notes


def latest_checkpoint(root: Path) -> Path | None:
    return find_checkpoint(root)[0]


def check_world(state: dict, path: Path, world: int, batch_size: int | None) -> None:
    """A checkpoint resumes on another world size only at the same global batch (batch_size x world).

    Rank r of W takes every W-th example of the epoch's order, so W ranks at batch b see, step by step,
    the same examples as one rank at batch W*b: the run continues exactly (up to float summation order).
    Any other world size is refused rather than silently continued differently.
    """
    saved_world = state.get("world_size", 1)
    if saved_world == world:
        return
    saved_global = state.get("global_batch")
    if saved_global is not None and batch_size is not None and saved_global == batch_size * world:
        return
    if saved_global is not None and saved_global % world == 0:
        fix = f"set train.batch_size={saved_global // world} to keep its global batch of {saved_global}, or "
    else:
        fix = ""
    raise UserError(
        f"checkpoint {path} was written by {saved_world} process(es) and cannot resume exactly with "
        f"{world}; {fix}launch it with {saved_world}"
    )


def is_sharded_checkpoint(path: Path) -> bool:
    return (path / DCP_DIR).is_dir()


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer, rank: int, world: int = 1, batch_size: int | None = None
) -> dict:
    """Restore weights, optimizer and RNG in place; return the trainer state.

    Reads both kinds: whole tensors (`trainable.safetensors`, one process or DDP) and DCP shards
    (`dcp/`, FSDP), into a plain or a sharded model alike, on any world size `check_world` allows.
    """
    state = json.loads((path / "trainer_state.json").read_text())
    check_world(state, path, world, batch_size)
    saved_world = state.pop("world_size", 1)
    state.pop("global_batch", None)
    if is_sharded_checkpoint(path):
        _load_sharded(path, model, optimizer)
    else:
        _load_whole(path, model, optimizer)
    restore_python_rng(state.pop("python_rng"))
    rng = load_file(str(path / "rng.safetensors"))
    mine = rank if rank < saved_world else 0  # another world size: the streams cannot continue exactly
    prefix = f"rank{mine}."
    restore_torch_rng(
        {"cpu": rng[f"rank{mine}"], **{k[len(prefix) :]: v for k, v in rng.items() if k.startswith(prefix)}}
    )
    return state


def _load_whole(path: Path, model: torch.nn.Module, optimizer) -> None:
    tensors = load_file(str(path / "trainable.safetensors"))
    meta = json.loads((path / "optimizer.json").read_text())
    opt_tensors = load_file(str(path / "optimizer.safetensors"))
    if not _sharded(model):
        load_trainable_state(model, tensors)
        optimizer.load_state_dict(_join_optimizer(opt_tensors, meta))
        return
    # A checkpoint of one process (or DDP) resumed under FSDP: whole tensors in, each rank keeps its shard.
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in tensors]
    if missing:
        raise RuntimeError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {missing[0]}")
    names = _optimizer_names(model, optimizer)
    by_name = {
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in meta["param_groups"]],
        "state": {names[int(idx)]: slots for idx, slots in meta["state"].items()},
    }
    source = {f"model.{n}": t for n, t in tensors.items()}
    for idx, slots in meta["state"].items():
        for key, value in slots.items():
            if value == "__tensor__":
                source[f"optim.{names[int(idx)]}.{key}"] = opt_tensors[f"{idx}.{key}"]
    _apply_flat(model, optimizer, source, by_name)


def read_trainable(path: Path) -> dict[str, torch.Tensor]:
    """The whole trainable tensors of checkpoint `path`, of either kind, in one process (for export)."""
    if not is_sharded_checkpoint(path):
        return load_file(str(path / "trainable.safetensors"))
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    reader = HuggingFaceStorageReader(str(path / DCP_DIR))
    wanted = {
        key: torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for key, md in reader.read_metadata().state_dict_metadata.items()
        if key.startswith("model.")
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(wanted, storage_reader=HuggingFaceStorageReader(str(path / DCP_DIR)), no_dist=True)
    return {key[len("model.") :]: value for key, value in wanted.items()}


def _sharded(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def _torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds torch's


def _optimizer_names(model: torch.nn.Module, optimizer) -> dict[int, str]:
    """Optimizer state index -> parameter name (indices count through the groups in order)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in _torch_optimizer(optimizer).param_groups for p in g["params"]]
    return {i: name_of[id(p)] for i, p in enumerate(params)}


# -- sharded checkpoints (FSDP) through torch.distributed.checkpoint ---------------------------------
DCP_DIR = "dcp"


def _sharded_targets(model: torch.nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The flat tensor dict DCP saves/loads (this rank's shards), and the optimizer's non-tensor part.

    Keys: `model.<param>` for trainable parameters, `optim.<param>.<slot>` for tensor optimizer state.
    Non-tensor optimizer state (hyperparameters per group, any non-tensor slot) stays in our JSON, so DCP
    only ever stores tensors: its safetensors writer keeps no pickled metadata.
    """
    from torch.distributed.checkpoint.state_dict import _init_optim_state, get_state_dict

    from leantune.train.distributed import resharded

    if _sharded(model):
        resharded(model)
    opt = _torch_optimizer(optimizer)
    _init_optim_state(opt)  # a fresh optimizer has no state to load into (zero step at lr 0)
    model_sd, optim_sd = get_state_dict(model, opt)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    flat = {f"model.{n}": model_sd[n] for n in trainable}
    meta: dict = {"param_groups": optim_sd["param_groups"], "state": {}}
    for name, slots in optim_sd["state"].items():
        meta["state"][name] = {}
        for key, value in slots.items():
            if torch.is_tensor(value):
                flat[f"optim.{name}.{key}"] = value
                meta["state"][name][key] = "__tensor__"
            else:
                meta["state"][name][key] = value
    return flat, meta


def _load_sharded(path: Path, model: torch.nn.Module, optimizer) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    flat, _ = _sharded_targets(model, optimizer)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(path / DCP_DIR)))  # reshards as needed
    _apply_flat(model, optimizer, flat, json.loads((path / "optimizer.json").read_text()))


def _apply_flat(model: torch.nn.Module, optimizer, source: dict[str, torch.Tensor], meta: dict) -> None:
    """Load `source` (the keys of `_sharded_targets`; whole tensors or this rank's shards) and the
    optimizer's name-keyed non-tensor `meta` into a plain or sharded model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from leantune.train.distributed import like

    targets, _ = _sharded_targets(model, optimizer)
    with torch.no_grad():
        for key, target in targets.items():
            if source[key] is not target:
                target.copy_(like(source[key], target))
    optim_sd = {
        "state": {
            name: {k: targets[f"optim.{name}.{k}"] if v == "__tensor__" else v for k, v in slots.items()}
            for name, slots in meta["state"].items()
        },
        "param_groups": meta["param_groups"],
    }
    model_sd = {k[len("model.") :]: v for k, v in targets.items() if k.startswith("model.")}
    set_state_dict(
        model,
        _torch_optimizer(optimizer),
        model_state_dict=model_sd,
        optim_state_dict=optim_sd,
        options=StateDictOptions(strict=False),
    )


def save_sharded_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer,
    trainer_state: dict,
    torch_rng: list[dict[str, torch.Tensor] | torch.Tensor],
    keep: int,
    method_tensors: list[dict[str, torch.Tensor]] | None,
    save_model: Callable[[Path], None] | None,
    rank: int,
) -> Path | None:
    """The FSDP checkpoint: every rank calls this; each writes its own shards, rank 0 the rest.

    The same atomic scheme as `save_checkpoint`: all ranks write DCP's files (safetensors, one per rank,
    the offsets of each shard in its JSON header) into the temporary folder rank 0 named; DCP's save
    returns on rank 0 only after every rank reported its write done; then rank 0 adds the JSON/RNG/
    method files and the manifest and renames. A checkpoint some rank did not finish is never renamed,
    so it is never taken as complete.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    tmp_name = [_fresh_temp(root, step).name if rank == 0 else None]
    dist.broadcast_object_list(tmp_name, src=0)
    tmp = root / tmp_name[0]
    flat, opt_meta = _sharded_targets(model, optimizer)
    dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(tmp / DCP_DIR), save_distributed=True))
    if rank != 0:
        return None
    try:
        _write_run_state(tmp, opt_meta, trainer_state, torch_rng, method_tensors, save_model)
    except OSError as exc:
        _refuse_full_disk(exc, root, tmp, step)
    return _publish(root, tmp, step, keep)
