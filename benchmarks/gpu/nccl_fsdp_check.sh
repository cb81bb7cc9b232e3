#!/usr/bin/env bash
# FSDP2 over NCCL on one CUDA GPU: `torchrun --nproc-per-node 1` leantune training (full and LoRA) on a tiny
# random BERT, then resume from its DCP checkpoint. One PASS/FAIL/SKIP line per check, with the losses.
#
# Needs: a CUDA machine with torch, transformers, peft and accelerate installed; no index, no hub. Run
# from the repository root:   bash benchmarks/gpu/nccl_fsdp_check.sh          (< 3 minutes)
# CPU dry run of the same logic over gloo:  CHECK_BACKEND=gloo CHECK_DEVICE=cpu bash benchmarks/gpu/...
#
# Not covered with one GPU: NCCL across 2 ranks (NCCL refuses two ranks on one device); the script runs
# that check too when it finds 2 or more GPUs.
set -uo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=${PYTHON:-python}

if [ "${CHECK_SKIP_INSTALL:-0}" != 1 ]; then
  if ! "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . >/tmp/leantune-pip.log 2>&1; then
    echo "FAIL install: pip install --no-deps -e . failed: $(tail -3 /tmp/leantune-pip.log | tr '\n' ' ')"
    exit 1
  fi
fi
# leantune's own imports beyond torch/transformers/peft/accelerate that `train` needs; a missing one is
# named here rather than as a traceback later (install it from a wheel: pip install --no-index X.whl)
missing=$("$PY" - <<'PY'
import importlib.util
need = {"pydantic": "pydantic", "yaml": "pyyaml", "safetensors": "safetensors", "tqdm": "tqdm",
        "numpy": "numpy", "psutil": "psutil", "tokenizers": "tokenizers", "datasets": "datasets"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
PY
)
if [ -n "$missing" ]; then
  echo "FAIL environment: leantune's train needs these packages, not installed here: $missing"
  exit 1
fi
timeout "${CHECK_TIMEOUT:-170}" "$PY" benchmarks/gpu/nccl_fsdp_check.py
rc=$?
[ $rc = 124 ] && echo "FAIL all: the checks ran past ${CHECK_TIMEOUT:-170} s"
exit $rc
