#!/usr/bin/env bash
# The one GPU run (spec/GPU.md), in one go and within 10 minutes:
#   1. install the checkout without touching the preinstalled torch (builds the CUDA extension), plus
#      any wheels carried in the git-ignored wheels/ folder (diffusers, ...), all with --no-deps;
#   2. run the test suite (on CUDA at real sizes);
#   3. run the benchmark (every level, real shapes), writing JSON and PNGs to OUT_DIR, within what is
#      left of the time budget;
#   4. print the summary table last.
#
# usage: bash benchmarks/gpu_run.sh OUT_DIR [extra arguments for python -m ditfast.bench]
# env:   DITFAST_GPU_RUN_SECONDS  whole budget (default 570, under the 10-minute limit)
#        DITFAST_TEST_SECONDS     cap on the test step (default 240)
#        DITFAST_SKIP_TESTS=1     skip step 2 (a benchmark-only run: the whole budget goes to it)
#        DITFAST_BENCH_COMMIT     commit to record when the tree was copied without .git
# OUT_DIR receives: bench_<date>_<commit>.json, its three PNGs, backend_table.json (when the run timed
# both the triton and the cuda backend), install.log, tests.log, bench.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: bash benchmarks/gpu_run.sh OUT_DIR [bench args]}"
shift
TOTAL="${DITFAST_GPU_RUN_SECONDS:-570}"
TEST_CAP="${DITFAST_TEST_SECONDS:-240}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
status=0
step() { printf '\n=== %s  (%ss elapsed)\n' "$*" "$SECONDS"; }

step "1/4 install"
if ! "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1; then
    echo "pip install -e . failed (tail of install.log follows); continuing from the source tree"
    tail -n 25 "$OUT/install.log"
    status=1
fi
for whl in wheels/*.whl; do
    [ -e "$whl" ] || continue
    if "$PY" -m pip install --no-deps "$whl" >>"$OUT/install.log" 2>&1; then
        echo "installed $(basename "$whl")"
    else
        echo "could not install $(basename "$whl") (see install.log)"
    fi
done
"$PY" -m ditfast.info 2>&1 | tail -n 30 || true

step "2/4 tests"
left=$((TOTAL - SECONDS - 150))  # keep at least 150 s for the benchmark and the summary
cap=$((left < TEST_CAP ? left : TEST_CAP))
if [ "${DITFAST_SKIP_TESTS:-0}" = "1" ]; then
    echo "skipped (DITFAST_SKIP_TESTS=1)"
elif [ "$cap" -lt 30 ]; then
    echo "skipping the tests: only ${left}s left of the budget"
else
    timeout "$cap" "$PY" -m pytest -q -p no:cacheprovider tests >"$OUT/tests.log" 2>&1
    rc=$?
    tail -n 15 "$OUT/tests.log"
    if [ "$rc" -eq 124 ]; then
        echo "tests stopped after ${cap}s (DITFAST_TEST_SECONDS); see tests.log"
    fi
    [ "$rc" -eq 0 ] || status=1
fi

step "3/4 benchmark"
left=$((TOTAL - SECONDS - 20))  # what remains, minus the summary
limit=$((left - 60))            # stop starting measurements a minute early: one can run long
bench_args=(--out "$OUT" --time-limit "$limit")
if [ "$limit" -lt 60 ]; then
    bench_args=(--out "$OUT" --quick --time-limit "$((left > 20 ? left - 10 : 10))")
fi
# progress lines on the console, everything in bench.log
timeout "$((left > 10 ? left : 10))" "$PY" -m ditfast.bench "${bench_args[@]}" "$@" 2>&1 \
    | tee "$OUT/bench.log" | grep -E '^\[[0-9]+/[0-9]+\]|^results:|plots|failed'
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || { echo "benchmark exited with $rc (see bench.log)"; status=1; }

step "4/4 summary"
# the measured triton-vs-cuda choice per op, dtype and width (copy it to ditfast/ops/backend_table.json)
for res in "$OUT"/bench_*.json; do
    [ -e "$res" ] && "$PY" scripts/backend_table.py "$res" --table "$OUT/backend_table.json" | tail -n 3
done
"$PY" -m ditfast.bench --summary "$OUT" || status=1
exit "$status"
