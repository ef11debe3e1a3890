#!/usr/bin/env bash
# The one prepared script for the lent GPU machine (docs/design.md §6.4): build for the card,
# run the GPU-marked tests, run the kernel benchmarks at paper scale, print a short table last,
# and write logs and JSON under $OUT. Usage (repo root): bash benchmarks/gpu_check.sh [pytest -k expr]
#
# Budget: one device call runs at most 10 minutes. Triton's JIT compiles are CPU-bound and each
# test file triggers its own, so the test files run in parallel processes, and each phase has a
# time limit that leaves room for the next (TEST_SECONDS, BENCH_SECONDS).
set -uo pipefail
OUT=${OUT:-/tmp/dive-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
TEST_SECONDS=${TEST_SECONDS:-300}
BENCH_SECONDS=${BENCH_SECONDS:-180}
export PYTHONUNBUFFERED=1
status=0
started=$SECONDS

# dive._C_cuda links the CUDA 13 runtime statically: it needs a driver >= 580.
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
  | tee "$OUT/gpu.txt"
arch=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') || exit 1
echo "== build for sm_${arch/./} ($($PY -c 'import torch; print(torch.cuda.get_device_name())'))"
DIVE_CUDA=1 DIVE_CUDA_ARCHS="$arch" $PY -m pip install -q --no-build-isolation --no-deps . \
  >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
$PY -c 'import dive, json; print(json.dumps(dive.build_info()))' | tee "$OUT/build_info.json"
$PY -c 'import dive; assert dive.build_info()["cuda_devices"] > 0, "dive._C_cuda sees no device"' \
  || { echo "dive._C_cuda cannot reach the GPU (driver older than its CUDA runtime?)"; exit 1; }
echo "   built in $((SECONDS - started)) s"

echo "== GPU tests (one process per file, at most ${TEST_SECONDS} s)"
pids=()
for f in $(grep -l "mark.gpu" tests/test_*.py); do
  name=$(basename "$f" .py)
  timeout "$TEST_SECONDS" $PY -P -m pytest "$f" -m gpu -q -p no:cacheprovider --maxfail=25 \
    ${1:+-k "$1"} --junitxml="$OUT/$name.xml" >"$OUT/$name.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do
  wait "$pid"
  rc=$?
  [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || status=1  # 5: nothing selected by -k in that file
done
for log in "$OUT"/test_*.log; do
  echo "-- $(basename "$log" .log): $(tail -n 1 "$log")"
  grep -E "^(FAILED|ERROR)" "$log" | head -8
done
echo "   tests done at $((SECONDS - started)) s"

echo "== benchmarks (at most ${BENCH_SECONDS} s)"
DIVE_BENCH_JSON="$OUT/bench.json" timeout "$BENCH_SECONDS" $PY -P -m pytest benchmarks -m gpu -q \
  -p no:cacheprovider ${1:+-k "$1"} --benchmark-columns=median,iqr \
  --benchmark-json="$OUT/bench_full.json" 2>&1 | tee "$OUT/bench.log" \
  | grep -A60 "dive benchmarks on" || status=1
grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$OUT/bench.log"

echo "== dispatch table entries for this card (merge into dive/ops/dispatch.json)"
$PY benchmarks/dispatch_table.py "$OUT/bench.json" | tee "$OUT/dispatch.json" || status=1
echo "   finished at $((SECONDS - started)) s, status $status"
exit $status
