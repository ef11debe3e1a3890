#!/usr/bin/env bash
# The one prepared script for a lent GPU (docs/design.md §6.4): build dive for the card, run the
# GPU-marked tests, time every shipped kernel configuration against the GEMM floor of the same
# run, and leave at most 8 files under $OUT (the device tool brings back no more):
#   summary.md     card, time per stage, test counts and failures, each measured ratio beside
#                  the prediction in benchmarks/RESULTS.md, extra memory, the winners per card
#   tests.xml      the GPU tests' JUnit report, every file merged
#   bench.json     every benchmark row (written as the run goes, so a killed run keeps its rows)
#   dispatch.json  this card's winners: `python benchmarks/dispatch_table.py --merge
#                  $OUT/dispatch.json` folds them into dive/ops/dispatch.json
#   logs.tgz       build, test and benchmark logs, pytest-benchmark's own JSON
#
# Usage: bash benchmarks/gpu_check.sh [quick|full] [pytest -k expression]
#   quick (default, 240 s budget on an H100/H200, the build included): tests and benchmarks
#         marked quick: one correctness case per backend x dtype x mask/tail kind (about 20
#         Triton specialisations per test file, ~1.7 s each to compile), COCO-5K forward and
#         the training step per dtype, the slot-attention step at N=36, the evaluation.
#   full (480 s budget): every GPU test and benchmark.
# The benchmarks get what the budget leaves after the build and the tests (bench.json keeps the
# rows measured before a stop). TEST_SECONDS / BENCH_SECONDS set the two limits instead.
# DIVE_GPU_CHECK_DRY=1: no GPU and no build (the installed package is used); GPU tests are
# collected and skipped, the GPU benchmarks run on CPU at tiny sizes (tests/test_gpu_check.py).
#
# Every Python call runs with -P (Python >= 3.11) from a folder outside the tree: from the
# repository root a plain `python -c "import dive"` imports the unbuilt source tree instead of
# the installed package.
set -uo pipefail
mode=${1:-quick}
kexpr=${2:-}
case $mode in
  quick) select="gpu and quick"; budget=240; test_s=${TEST_SECONDS:-75} ;;
  full) select="gpu"; budget=480; test_s=${TEST_SECONDS:-150} ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [quick|full] [pytest -k expression]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
OUT=${OUT:-/tmp/dive-gpu-check}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)  # everything but the result files; packed into logs.tgz at the end
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python3}
DRY=${DIVE_GPU_CHECK_DRY:-0}
export PYTHONUNBUFFERED=1 DIVE_GPU_CHECK_DRY=$DRY
status=0
card=unknown
started=$SECONDS
stage_started=$SECONDS

SAFE=$($PY -P -c 'print("-P")' 2>/dev/null)
py() {  # python, never importing the tree: -P where Python has it, and run from $WORK
  (cd "$WORK" && $PY $SAFE "$@")
}
py_for() {  # py_for SECONDS ARGS: py with a time limit; SIGINT first, so pytest still reports
  local seconds=$1
  shift
  (cd "$WORK" && timeout -s INT -k 15 "$seconds" $PY $SAFE "$@")
}

stage() {  # stage NAME RC: the elapsed time of the stage that just ended, for summary.md
  local took=$((SECONDS - stage_started))
  printf '%s\t%s\t%s\n' "$1" "$took" "$2" >>"$WORK/stages.tsv"
  echo "   $1: ${took} s, rc $2 (total $((SECONDS - started)) s)"
  [ "$2" -eq 0 ] || status=1
  stage_started=$SECONDS
}

finish() {  # the report and the result files, whatever happened before
  py "$REPO/benchmarks/gpu_report.py" --out "$OUT" --work "$WORK" --mode "$mode" --card "$card" \
    --dry "$DRY" >"$WORK/report.log" 2>&1 || { cat "$WORK/report.log"; status=1; }
  tar -czf "$OUT/logs.tgz" -C "$WORK" . 2>/dev/null || status=1
  [ -f "$OUT/summary.md" ] && cat "$OUT/summary.md"
  echo "== finished in $((SECONDS - started)) s, status $status; results:" $(ls "$OUT")
  exit $status
}

echo "== card ($mode run)"
if [ "$DRY" = 1 ]; then
  card="dry run: no GPU, CPU stand-in"
  arch=9.0
else
  # dive._C_cuda links the CUDA 13 runtime statically: it needs a driver >= 580.
  card=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)
  arch=$(py -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') \
    || { echo "torch sees no CUDA device"; card="${card:-none}"; stage card 1; finish; }
fi
echo "   $card, sm_${arch/./}"
stage card 0

echo "== build for sm_${arch/./}"
if [ "$DRY" = 1 ]; then
  echo "skipped: dry run, the installed package is used" | tee "$WORK/build.log"
  rc=0
else
  DIVE_CUDA=1 DIVE_CUDA_ARCHS="$arch" timeout 150 $PY -m pip install -q \
    --no-build-isolation --no-deps . >"$WORK/build.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || tail -40 "$WORK/build.log"
fi
# The installed package (not the tree), its compiled modules, and the GPU they reach.
py - "$DRY" >>"$WORK/build.log" 2>&1 <<'EOF' || rc=1
import json, sys
import dive
info = dive.build_info()
print(json.dumps(dict(info, path=dive.__path__[0])))
assert info["cpp"], f"dive at {dive.__path__[0]} has no dive._C: not the installed package"
if sys.argv[1] != "1":
    assert info["cuda_devices"] > 0, ("dive._C_cuda cannot reach the GPU (driver older than its "
                                      f"CUDA runtime?): {info.get('cuda_error')}")
EOF
tail -n 1 "$WORK/build.log"
stage build $rc
[ $rc -eq 0 ] || finish

echo "== GPU tests: -m '$select' (one process per file, at most $test_s s)"
mkdir -p "$WORK/junit"
pids=()
for f in $(grep -l "mark\.gpu" tests/test_*.py); do
  name=$(basename "$f" .py)
  py_for "$test_s" -m pytest "$REPO/$f" -m "$select" -q -p no:cacheprovider \
    --maxfail=25 ${kexpr:+-k "$kexpr"} --junitxml="$WORK/junit/$name.xml" \
    </dev/null >"$WORK/$name.log" 2>&1 &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do
  wait "$pid"
  r=$?
  [ $r -eq 0 ] || [ $r -eq 5 ] || rc=1  # 5: nothing selected in that file
done
for log in "$WORK"/test_*.log; do
  echo "-- $(basename "$log" .log): $(tail -n 1 "$log")"
  grep -E "^(FAILED|ERROR)" "$log" | head -8
done
stage tests $rc

# What the budget leaves, less ~15 s for the winners and the report; at least 60 s.
left=$((budget - (SECONDS - started) - 15))
bench_s=${BENCH_SECONDS:-$((left > 60 ? left : 60))}
echo "== benchmarks: -m '$select' (at most $bench_s s)"
export DIVE_BENCH_JSON="$OUT/bench.json"
py_for "$bench_s" -m pytest "$REPO/benchmarks" \
  -m "$select" -q -p no:cacheprovider ${kexpr:+-k "$kexpr"} --benchmark-columns=median,iqr \
  --benchmark-json="$WORK/bench_full.json" </dev/null >"$WORK/bench.log" 2>&1
rc=$?
grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed|skipped)" "$WORK/bench.log" | tail -12
stage benchmarks $rc

echo "== this card's winners"
py "$REPO/benchmarks/dispatch_table.py" "$OUT/bench.json" >"$OUT/dispatch.json" \
  2>"$WORK/dispatch.log"
rc=$?
cat "$OUT/dispatch.json" "$WORK/dispatch.log"
stage dispatch $rc
finish
