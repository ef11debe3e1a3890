#!/usr/bin/env bash
# The one prepared script for the lent GPU machine (DESIGN.md §5): build for the card, run the
# GPU-marked tests, run the kernel benchmarks at paper scale, print a short table last, and
# write logs and JSON under $OUT. Usage (repo root): bash benchmarks/gpu_check.sh [pytest -k expr]
set -uo pipefail
OUT=${OUT:-/tmp/dive-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0

arch=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') || exit 1
echo "== build for sm_${arch/./} ($($PY -c 'import torch; print(torch.cuda.get_device_name())'))"
DIVE_CUDA=1 DIVE_CUDA_ARCHS="$arch" $PY -m pip install -q --no-build-isolation --no-deps . \
  >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
$PY -c 'import dive, json; print(json.dumps(dive.build_info()))' | tee "$OUT/build_info.json"

echo "== GPU tests"
$PY -m pytest -P tests -m gpu -q -x -p no:cacheprovider ${1:+-k "$1"} \
  --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 || status=1

echo "== benchmarks"
DIVE_BENCH_JSON="$OUT/bench.json" $PY -m pytest -P benchmarks -m gpu -q -p no:cacheprovider \
  ${1:+-k "$1"} --benchmark-columns=median,iqr --benchmark-json="$OUT/bench_full.json" \
  2>&1 | tee "$OUT/bench.log" | grep -A100 "dive benchmarks on" || status=1

echo "== dispatch table entries for this card (merge into dive/ops/dispatch.json)"
$PY benchmarks/dispatch_table.py "$OUT/bench.json" | tee "$OUT/dispatch.json" || status=1
exit $status
