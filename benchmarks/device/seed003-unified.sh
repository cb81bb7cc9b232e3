#!/usr/bin/env bash
# Runs the seed003-unified suite on a CUDA machine that has PyTorch, transformers, accelerate and
# scikit-learn but no network (the device machine lent to leantune sessions), in parallel shards.
#
# It expects, beside the repository, what `benchmarks/device/pack.sh` puts under build/device/: wheels of
# the packages that image lacks (pydantic, datasets and their missing dependencies, peft 0.21.2), the
# embedded MiniLM as a package folder with its weights stored in float16 (the transfer limit is 64 MiB;
# they load as float32), and the Rotten Tomatoes file in a leantune cache; and benchmarks/data/trec.csv.
# Usage there: bash benchmarks/device/seed003-unified.sh OUT_DIR [SHARDS]
set -uo pipefail
OUT=${1:?output folder}
SHARDS=${2:-8}
SUITE=seed003-unified
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD/src:$PWD/build/device/site LEANTUNE_CACHE=$PWD/build/device/cache
PY=${PY:-python3}
finish() {
  tar czf "$OUT/$SUITE.tar.gz" -C benchmarks/results "$SUITE" 2>/dev/null
  tar czf "$OUT/logs.tar.gz" -C /tmp seed003-logs 2>/dev/null
}
trap finish EXIT
mkdir -p /tmp/seed003-logs
$PY -m pip install -q --no-deps --no-index build/device/wheels/*.whl 2>&1 | tail -2
$PY -c "import torch, transformers, peft, accelerate, datasets, pydantic; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# one run first: a broken environment fails here, in seconds, not in every shard
t0=$(date +%s)
$PY -m leantune bench $SUITE --only rt_lora_lr1e-3_s0 || { tail -30 /tmp/leantune-bench-*/*.log; exit 1; }
echo "probe run: $(( $(date +%s) - t0 )) s"

shard() {  # run the given ids in SHARDS parallel `leantune bench` invocations, round-robin
  local phase=$1 limit=$2; shift 2
  local ids=("$@") pids=()
  for ((k = 0; k < SHARDS; k++)); do
    local mine=()
    for ((i = k; i < ${#ids[@]}; i += SHARDS)); do mine+=("${ids[i]}"); done
    [ ${#mine[@]} -eq 0 ] && continue
    timeout "$limit" $PY -m leantune bench $SUITE --only "${mine[@]}" > "/tmp/seed003-logs/$phase-$k.log" 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}"
  grep -h "failed" /tmp/seed003-logs/$phase-*.log | head -5
}

mapfile -t sweep < <(grep -o '[a-z]*_[a-z0-9]*_lr[^_]*_s0' benchmarks/suites/$SUITE.yaml)
t0=$(date +%s)
shard sweep "${SWEEP_LIMIT:-300}" "${sweep[@]}"
echo "sweep (seed 0, ${#sweep[@]} runs): $(( $(date +%s) - t0 )) s, $(ls benchmarks/results/$SUITE/*_s0-r1.json | wc -l) artefacts"

read -r -a seeds <<< "$($PY -m leantune.bench.sweep $SUITE --next)"
t0=$(date +%s)
shard seeds "${SEEDS_LIMIT:-170}" "${seeds[@]}"
echo "seeds 1-2 at the chosen rates (${#seeds[@]} runs): $(( $(date +%s) - t0 )) s"
$PY -m leantune.bench.sweep $SUITE --write
$PY -m leantune.bench.sweep $SUITE --next | wc -w | xargs echo "runs still missing:"
