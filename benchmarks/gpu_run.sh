#!/usr/bin/env bash
# The one GPU run, in tiers, most information first (docs/gpu-run.md). Every tier writes its result
# file into OUT_DIR before the next starts; the whole run keeps within DITFAST_GPU_RUN_SECONDS (360).
#   1 install      pip install -e . for sm_90 only (+ wheels/*.whl); beside it the offline sm_90 compile
#                  report of the Triton kernels (tests/compile_sm90.py)   -> logs.tar.gz
#   2 smoke        every op x backend, fwd+bwd, FLUX.1-dev / SD3.5-large   -> smoke.json
#   3 tests        kernel tests first, pytest -n 8, stopped at the cap     -> tests.xml / tests.log (in the archive)
#   4 ops          ops + attention benchmark, no compile peers             -> bench_ops.json, backend_table.json
#   5 blocks       blocks + train benchmark, no compile peers              -> bench_blocks.json
#   6 peers        whole models, then the torch.compile peers (--quick)    -> bench_peers.json
#   end            summary.txt (printed last); logs.tar.gz holds every log and PNG
# OUT_DIR gets at most 8 plain files, no folder, no leftover temporary file.
#
# usage: bash benchmarks/gpu_run.sh OUT_DIR               the real run (a CUDA GPU)
#        bash benchmarks/gpu_run.sh --rehearse OUT_DIR    the same tiers on CPU at tiny sizes (the Triton
#                                                         interpreter, the extension's CPU kernels), no pip
#                                                         install, then checks what the real run returns
# env:   DITFAST_GPU_RUN_SECONDS  whole budget (default 360; 290 in a rehearsal)
#        DITFAST_BENCH_COMMIT     commit to record when the tree was copied without .git
#        PYTHON                   interpreter (default python3)
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSE=0
if [ "${1:-}" = "--rehearse" ]; then REHEARSE=1; shift; fi
OUT="${1:?usage: bash benchmarks/gpu_run.sh [--rehearse] OUT_DIR}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/ditfast-gpu-run.XXXXXX")"
LOGS="$WORK/logs"
mkdir -p "$LOGS"
# every tier imports ditfast from this checkout, installed or not (a failed install still leaves the smoke and tests)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${DITFAST_BENCH_COMMIT:-}" ]; then
    DITFAST_BENCH_COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
    export DITFAST_BENCH_COMMIT
fi
if [ "$REHEARSE" = 1 ]; then
    BASE=290
    # cumulative deadlines (seconds since the start) of tiers 1..6; a tier that ends early leaves its time to the next
    DEADLINES=(30 115 165 205 242 284)
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    # the interpreter's Triton kernels are exercised by the smoke; the bench tiers force the extension's CPU kernels
    BENCH_ARGS=(--device cpu --quick --backends cuda)
else
    BASE=360
    DEADLINES=(90 190 280 320 345 355)
    BENCH_ARGS=()
fi
TOTAL="${DITFAST_GPU_RUN_SECONDS:-$BASE}"
SECONDS=0
status=0
step() { printf '\n=== tier %s  (%ss elapsed)\n' "$*" "$SECONDS"; }
left() {  # seconds until tier $1's deadline, scaled to TOTAL, at least $2
    local d=$(( ${DEADLINES[$(( $1 - 1 ))]} * TOTAL / BASE - SECONDS ))
    echo $(( d > $2 ? d : $2 ))
}
publish() {  # copy finished files from WORK into OUT atomically (a hidden partial name, then a rename)
    local f
    for f in "$@"; do
        [ -s "$WORK/$f" ] || continue
        cp "$WORK/$f" "$OUT/.$f.part" && mv -f "$OUT/.$f.part" "$OUT/$f"
    done
    tar -czf "$WORK/logs.tar.gz" -C "$WORK" logs 2>/dev/null &&
        cp "$WORK/logs.tar.gz" "$OUT/.logs.tar.gz.part" && mv -f "$OUT/.logs.tar.gz.part" "$OUT/logs.tar.gz"
}
cleanup() { rm -f "$OUT"/.*.part "$OUT"/*.tmp; rm -rf "$WORK"; }
trap cleanup EXIT
trap 'echo "interrupted"; exit 130' INT TERM

# ------------------------------------------------------------------------------------------- 1 install
step "1/6 install"
{ date -u; nvidia-smi 2>&1 | head -n 20; } >"$LOGS/machine.txt" 2>&1
# the offline sm_90 compile report of this checkout's Triton kernels (ptxas only, no GPU), beside the install
sm90_pid=""
if [ -z "${DITFAST_SM90_REPORT:-}" ] && [ -e tests/compile_sm90.py ]; then
    env -u TRITON_INTERPRET timeout 120 "$PY" tests/compile_sm90.py --report "$LOGS/sm90_report.json" >"$LOGS/sm90.log" 2>&1 &
    sm90_pid=$!
fi
if [ "$REHEARSE" = 1 ]; then
    echo "rehearsal: no pip install (would run: DITFAST_CUDA_ARCHS=9.0 $PY -m pip install --no-build-isolation --no-deps -e .)" \
        >"$LOGS/install.log"
    "$PY" -c "import ditfast, ditfast._C; print('ditfast', ditfast.__version__, 'from', ditfast.__file__)" >>"$LOGS/install.log" 2>&1 || status=1
else
    # PIP_BREAK_SYSTEM_PACKAGES: a system python3 marked externally managed (PEP 668) still takes the install
    DITFAST_CUDA_ARCHS=9.0 MAX_JOBS="$(nproc)" PIP_BREAK_SYSTEM_PACKAGES=1 timeout "$(left 1 30)" \
        "$PY" -m pip install --no-build-isolation --no-deps -e . >"$LOGS/install.log" 2>&1 ||
        { echo "pip install -e . failed (tail follows); going on from the source tree"; tail -n 20 "$LOGS/install.log"; status=1; }
    for whl in wheels/*.whl; do
        [ -e "$whl" ] || continue
        PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install --no-deps "$whl" >>"$LOGS/install.log" 2>&1 && echo "installed $(basename "$whl")" ||
            echo "could not install $(basename "$whl") (see install.log)"
    done
fi
"$PY" -m ditfast.info >"$LOGS/ditfast_info.txt" 2>&1 || true
tail -n 3 "$LOGS/install.log"
if [ -n "$sm90_pid" ]; then
    wait "$sm90_pid" && [ -s "$LOGS/sm90_report.json" ] && export DITFAST_SM90_REPORT="$LOGS/sm90_report.json" &&
        echo "sm_90 report: $(grep -c '"kernel"' "$LOGS/sm90_report.json") kernel configs" ||
        echo "sm_90 report: not produced (see sm90.log)"
fi
publish

# ------------------------------------------------------------------------------------------- 2 smoke
step "2/6 smoke: every op x backend at FLUX.1-dev / SD3.5-large shapes, bf16"
cap="$(left 2 20)"
smoke_args=(--out "$WORK/smoke.json")
[ "$REHEARSE" = 1 ] && smoke_args+=(--tiny)
DITFAST_BENCH_DEADLINE=$(( $(date +%s) + cap - 12 )) timeout -k 10 "$cap" \
    "$PY" benchmarks/smoke.py "${smoke_args[@]}" >"$LOGS/smoke.log" 2>&1
rc=$?
grep -E '^\[|^smoke' "$LOGS/smoke.log" | tail -n 25
[ "$rc" -eq 0 ] || { echo "smoke exited with $rc (see smoke.log)"; status=1; }
publish smoke.json

# ------------------------------------------------------------------------------------------- 3 tests
step "3/6 kernel tests (stopped at the cap with pytest's summary)"
cap="$(left 3 20)"
files=()
for f in test_modulate test_rope test_attention_kernel test_attention test_prepare test_cuda_ext test_attention_dispatch \
         test_edge_cases test_validation test_properties test_blocks test_blocks_backends test_models test_training; do
    [ -e "tests/$f.py" ] && files+=("tests/$f.py")
done
xdist=()
if [ "$REHEARSE" = 1 ]; then
    files=(tests/test_modulate.py tests/test_rope.py)  # enough to reach the cap under the interpreter
elif "$PY" -c "import xdist" 2>/dev/null; then
    xdist=(-n 8)
fi
# no test starts after cap-20 s (pytest then prints its summary and writes the XML); SIGINT at cap-8 s stops
# a test that runs past that, SIGKILL 8 s later
timeout -s INT -k 8 "$(( cap - 8 > 10 ? cap - 8 : 10 ))" "$PY" benchmarks/run_tests.py "$(( cap - 20 > 5 ? cap - 20 : 5 ))" \
    -q -ra -p no:cacheprovider "${xdist[@]}" --junitxml="$LOGS/tests.xml" "${files[@]}" >"$LOGS/tests.log" 2>&1
rc=$?
tail -n 4 "$LOGS/tests.log"
case "$rc" in
    0) ;;
    2|124|130|137) echo "tests stopped at their ${cap}s cap (summary above; full list in tests.log)"
                   [ -s "$LOGS/tests.xml" ] || { echo "no JUnit XML was written"; status=1; } ;;
    *) status=1 ;;
esac
grep -qE "^(FAILED|ERROR) " "$LOGS/tests.log" && status=1
publish

# ------------------------------------------------------------------------------------------- 4-6 bench
bench() {  # tier name json_stem seconds args...
    local tier="$1" stem="$2" cap="$3"
    shift 3
    DITFAST_BENCH_DEADLINE=$(( $(date +%s) + cap - 15 )) timeout -s INT -k 10 "$cap" \
        "$PY" -m ditfast.bench --json "$WORK/$stem.json" "${BENCH_ARGS[@]}" "$@" >"$LOGS/$stem.log" 2>&1
    local rc=$?
    grep -E '^\[[0-9]+/[0-9]+\]|^results:|^plot|failed' "$LOGS/$stem.log" | tail -n 12
    [ "$rc" -eq 0 ] || { echo "tier $tier: benchmark exited with $rc (see $stem.log)"; status=1; }
    [ -e "$WORK/$stem.png" ] && mv "$WORK/$stem.png" "$LOGS/"
}
step "4/6 benchmark: ops and attention (no compile peers)"
bench 4 bench_ops "$(left 4 25)" --levels ops,attention --no-compile
if [ "$REHEARSE" = 0 ] && [ -s "$WORK/bench_ops.json" ]; then
    "$PY" scripts/backend_table.py "$WORK/bench_ops.json" --table "$WORK/backend_table.json" >>"$LOGS/bench_ops.log" 2>&1 &&
        tail -n 1 "$LOGS/bench_ops.log"
fi
publish bench_ops.json backend_table.json

step "5/6 benchmark: blocks and training step (no compile peers)"
bench 5 bench_blocks "$(left 5 25)" --levels blocks,train --no-compile
publish bench_blocks.json

step "6/6 benchmark: whole models, then torch.compile peers (as time allows)"
cap="$(left 6 0)"
if [ "$cap" -ge 30 ]; then
    bench 6 bench_peers "$cap" --levels models,ops,attention,blocks --quick
    publish bench_peers.json
else
    echo "skipped: ${cap}s left of the ${TOTAL}s budget"
fi

# ------------------------------------------------------------------------------------------- summary
"$PY" benchmarks/outcome.py summary "$WORK" >"$WORK/summary.txt" 2>&1 || status=1
publish summary.txt
if [ "$REHEARSE" = 1 ]; then
    "$PY" benchmarks/outcome.py check "$OUT" --expect smoke.json,bench_ops.json,bench_blocks.json,bench_peers.json,summary.txt,logs.tar.gz ||
        status=1
fi
printf '\n=== summary  (%ss elapsed, budget %ss; files in %s: %s)\n' "$SECONDS" "$TOTAL" "$OUT" "$(ls "$OUT" | tr '\n' ' ')"
cat "$WORK/summary.txt"
exit "$status"
