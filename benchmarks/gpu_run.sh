#!/usr/bin/env bash
# The one GPU run, in tiers, most information first (docs/gpu-run.md). Every tier writes its result
# file into OUT_DIR before the next starts; the whole run keeps within its budget (430 s on a GPU).
#   1 install      pip install -e . for sm_90 only (+ wheels/*.whl); beside it, bounded, the offline
#                  sm_90 compile report of the Triton kernels (tests/compile_sm90.py)  -> logs.tar.gz
#   2 smoke        every op x backend, fwd+bwd, FLUX.1-dev / SD3.5-large   -> smoke.json
#   3 tests        the kernel and extension test files, pytest -n 8, capped -> tests.xml / tests.log (archive)
#   4 ops          ops + attention benchmark, no compile peers             -> bench_ops.json, backend_table.json
#   5 blocks       blocks + train benchmark, no compile peers              -> bench_blocks.json
#   6 peers        whole models (diffusers carried), then the torch.compile peers of the target ops
#                  and attention (--quick)                                 -> bench_peers.json
#   end            summary.txt (the full report); logs.tar.gz (every log, PNG, run.json, the file manifest);
#                  a short per-tier digest printed last, with the command that reruns what failed
# OUT_DIR gets at most 8 plain files, no folder, no leftover temporary file.
#
# A sticky CUDA error (the context dies in one kernel) stops that tier's process with exit status 3 after
# writing what it measured and naming the culprit (op, backend, shape); the tier is rerun in a fresh process
# that keeps what was measured and excludes the culprit, and the later tiers exclude it too
# ($DITFAST_GPU_RUN_EXCLUDE). In tier 3 the tests a dead context skipped are rerun in a fresh process.
#
# usage: bash benchmarks/gpu_run.sh [--rehearse] [--tiers 2,4,5] [--seconds S] OUT_DIR
#   --rehearse   the same tiers on CPU at tiny sizes (the Triton interpreter, the extension's CPU kernels,
#                pytest-xdist -n 2, a simulated sticky error in the smoke), no pip install; then checks
#                what the real run would return
#   --tiers      run only these tiers (1-6; the digest of a run prints the ones to rerun); their slices
#                are scaled to --seconds
#   --seconds    the whole budget (default: 430 on a GPU, 320 in a rehearsal; $DITFAST_GPU_RUN_SECONDS)
# env:   DITFAST_BENCH_COMMIT     the commit (the tree is copied without .git; scripts/gpu_shot.sh prints it)
#        DITFAST_BENCH_TREE       the hash of the files of that commit (scripts/gpu_shot.sh): checked here
#        DITFAST_GPU_RUN_EXCLUDE  op:backend[,...] to exclude from every tier (a culprit of an earlier run)
#        PYTHON                   interpreter (default python3)
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSE=0
TIERS=""
SECS="${DITFAST_GPU_RUN_SECONDS:-}"
while [ $# -gt 1 ]; do
    case "$1" in
        --rehearse) REHEARSE=1; shift ;;
        --tiers) TIERS="$2"; shift 2 ;;
        --seconds) SECS="$2"; shift 2 ;;
        *) break ;;
    esac
done
OUT="${1:?usage: bash benchmarks/gpu_run.sh [--rehearse] [--tiers LIST] [--seconds S] OUT_DIR}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/ditfast-gpu-run.XXXXXX")"
LOGS="$WORK/logs"
mkdir -p "$LOGS"
if [ -z "${DITFAST_BENCH_COMMIT:-}" ]; then
    DITFAST_BENCH_COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
    export DITFAST_BENCH_COMMIT
fi
if [ "$REHEARSE" = 1 ]; then
    # As the GPU machine does, run from a copy of the files that travel (no .git, no build outputs), with
    # ditfast._C built into it by setup.py: the checkout's own build when it is of these sources and this
    # torch (CI), else a build for this interpreter, cached by its source hash (another torch: the GPU
    # machine's versions). The build, when there is one, comes before the clock starts.
    SRC="$WORK/src"
    mkdir -p "$SRC"
    "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import outcome; print('\n'.join(outcome.tree_files('.')))" |
        while IFS= read -r f; do mkdir -p "$SRC/$(dirname "$f")"; cp -p "$f" "$SRC/$f"; done
    cp -p README.md "$SRC/" 2>/dev/null; cp -p LICENSE "$SRC/" 2>/dev/null
    hash="$(cd "$SRC" && "$PY" setup.py --source-hash 2>/dev/null)"
    cache="${DITFAST_REHEARSAL_CACHE:-$HOME/.cache/ditfast/rehearsal-ext}/$("$PY" -c 'import torch, sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}")')-$hash"
    own="$("$PY" -c "import sys, ditfast._build_info as b; sys.exit(0 if b.SOURCE_HASH == sys.argv[1] else 1)" "$hash" 2>/dev/null && ls ditfast/_C.*.so 2>/dev/null | head -n 1)"
    if [ -n "$own" ]; then
        cp -p "$own" ditfast/_build_info.py "$SRC/ditfast/"
        echo "rehearsal: ditfast._C of the checkout (source hash $hash, this torch)" >"$WORK/build.log"
    elif ls "$cache"/_C.*.so >/dev/null 2>&1; then
        cp -p "$cache"/_C.*.so "$cache/_build_info.py" "$SRC/ditfast/"
        echo "rehearsal: ditfast._C from $cache" >"$WORK/build.log"
    else
        echo "rehearsal: building ditfast._C for this interpreter (source hash $hash) before the clock starts; cached in $cache"
        b0=$SECONDS
        (cd "$SRC" && env -u CUDA_HOME DITFAST_CUDA_ARCHS=9.0 MAX_JOBS="${MAX_JOBS:-2}" "$PY" setup.py build_ext --inplace) >"$WORK/build.log" 2>&1 &&
            mkdir -p "$cache" && cp -p "$SRC"/ditfast/_C.*.so "$SRC/ditfast/_build_info.py" "$cache/"
        grep -E "^ditfast setup:" "$WORK/build.log"
        echo "rehearsal: build took $(( SECONDS - b0 ))s"
    fi
    cd "$SRC"
fi
# every tier imports ditfast from this tree, installed or not (a failed install still leaves the smoke and tests)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$REHEARSE" = 1 ]; then
    # slice of each tier 1..6 and of the end, in seconds; a tier that ends early leaves its time to the next
    SLICES=(25 95 90 35 35 30 10)
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    # the interpreter's Triton kernels are exercised by the smoke; the bench tiers force the extension's CPU kernels
    BENCH_ARGS=(--device cpu --quick --backends cuda)
    export DITFAST_GPU_RUN_INJECT_STICKY="${DITFAST_GPU_RUN_INJECT_STICKY-gated_residual:triton}"
else
    SLICES=(60 100 60 90 70 40 10)
    BENCH_ARGS=()
fi
ALL_TIERS="1,2,3,4,5,6"
TIERS="${TIERS:-$ALL_TIERS}"
sel() { case ",$TIERS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
BASE=0
for i in 1 2 3 4 5 6; do sel "$i" && BASE=$(( BASE + SLICES[i - 1] )); done
BASE=$(( BASE + SLICES[6] ))
TOTAL="${SECS:-$BASE}"
DEADLINES=()  # cumulative deadline of tiers 1..6 (an unselected tier adds nothing)
acc=0
for i in 1 2 3 4 5 6; do sel "$i" && acc=$(( acc + SLICES[i - 1] )); DEADLINES+=("$acc"); done
SECONDS=0
status=0
TIER_STATUS="$LOGS/tiers.tsv"  # tier, name, status, rc, start s, end s, note (read by outcome.py digest)
printf 'tier\tname\tstatus\trc\tstart_s\tend_s\tnote\n' >"$TIER_STATUS"
EXCLUDE_FILE="$LOGS/excluded.txt"  # culprits, op:backend per line
: >"$EXCLUDE_FILE"
[ -n "${DITFAST_GPU_RUN_EXCLUDE:-}" ] && tr ',' '\n' <<<"$DITFAST_GPU_RUN_EXCLUDE" >>"$EXCLUDE_FILE"
step() { T_START=$SECONDS; printf '\n=== tier %s  (%ss elapsed)\n' "$*" "$SECONDS"; }
left() {  # seconds until tier $1's deadline, scaled to TOTAL, at least $2
    local d=$(( ${DEADLINES[$(( $1 - 1 ))]} * TOTAL / BASE - SECONDS ))
    echo $(( d > $2 ? d : $2 ))
}
record() {  # tier name status rc note: one line of tiers.tsv
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${T_START:-0}" "$SECONDS" "${5:-}" >>"$TIER_STATUS"
    [ "$3" = "failed" ] && status=1
    return 0
}
exclusions() { grep -v '^$' "$EXCLUDE_FILE" | sort -u | paste -sd, -; }
add_culprit() {  # json_file: the aborted op:backend it names -> EXCLUDE_FILE; prints it
    "$PY" - "$1" <<'EOF' | tee -a "$EXCLUDE_FILE"
import json, sys
d = json.load(open(sys.argv[1]))
a = d.get("aborted") or (d.get("meta") or {}).get("aborted") or {}
if a.get("op") and a.get("backend"):
    print(f"{a['op']}:{a['backend']}")
EOF
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
sm90_pid=""
reap_sm90() {  # $1: seconds to wait at most; the report is used once it exists, else killed at the end
    [ -n "$sm90_pid" ] || return 0
    local t=$(( SECONDS + $1 ))
    while kill -0 "$sm90_pid" 2>/dev/null && [ "$SECONDS" -lt "$t" ]; do sleep 1; done
    if ! kill -0 "$sm90_pid" 2>/dev/null; then
        wait "$sm90_pid" 2>/dev/null
        sm90_pid=""
        if [ -s "$LOGS/sm90_report.json" ]; then
            export DITFAST_SM90_REPORT="$LOGS/sm90_report.json"
            echo "sm_90 report: $(grep -c '"kernel"' "$LOGS/sm90_report.json") kernel configs (after ${SECONDS}s)"
        else
            echo "sm_90 report: not produced (see sm90.log)"
        fi
    fi
}
cleanup() {
    [ -n "$sm90_pid" ] && kill "$sm90_pid" 2>/dev/null
    rm -f "$OUT"/.*.part "$OUT"/*.tmp; rm -rf "$WORK"
}
trap cleanup EXIT
trap 'echo "interrupted"; exit 130' INT TERM

# ------------------------------------------------------------------------------------------- provenance
{ date -u; echo "tiers $TIERS, budget ${TOTAL}s, rehearsal $REHEARSE"; nvidia-smi 2>&1 | head -n 20
  command -v nvcc && nvcc --version 2>&1 | tail -n 2; "$PY" -c "import sys; print(sys.version)"
  "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|triton|numpy|diffusers|pytest|pytest-xdist|flash)" ; } >"$LOGS/machine.txt" 2>&1
TREE="$("$PY" benchmarks/outcome.py tree-hash . --manifest "$LOGS/manifest.txt" 2>>"$LOGS/machine.txt" || echo unknown)"
export DITFAST_BENCH_TREE_RAN="$TREE"
if [ -n "${DITFAST_BENCH_TREE:-}" ] && [ "$DITFAST_BENCH_TREE" != "$TREE" ]; then
    echo "WARNING: the files here (tree $TREE) are not those of commit $DITFAST_BENCH_COMMIT (tree $DITFAST_BENCH_TREE):" \
         "the results are recorded as from a modified tree"
    export DITFAST_BENCH_COMMIT="$DITFAST_BENCH_COMMIT+modified"
fi
echo "commit $DITFAST_BENCH_COMMIT, files $TREE (logs/manifest.txt), tiers $TIERS, budget ${TOTAL}s"

# ------------------------------------------------------------------------------------------- 1 install
if sel 1; then
    step "1/6 install"
    # the offline sm_90 compile report of this checkout's Triton kernels (ptxas only, no GPU), beside the
    # install at low priority; waited for until tier 1's deadline at most, then picked up whenever it is done
    if [ -z "${DITFAST_SM90_REPORT:-}" ] && [ -e tests/compile_sm90.py ]; then
        env -u TRITON_INTERPRET timeout 150 nice -n 10 "$PY" tests/compile_sm90.py --report "$LOGS/sm90_report.json" >"$LOGS/sm90.log" 2>&1 &
        sm90_pid=$!
    fi
    rc=0
    if [ "$REHEARSE" = 1 ]; then
        { echo "rehearsal: no pip install (would run: DITFAST_CUDA_ARCHS=9.0 $PY -m pip install --no-build-isolation --no-deps -e .)"
          cat "$WORK/build.log"; } >"$LOGS/install.log"
        "$PY" -c "import ditfast, ditfast._C; print('ditfast', ditfast.__version__, 'from', ditfast.__file__)" >>"$LOGS/install.log" 2>&1 || rc=1
    else
        # PIP_BREAK_SYSTEM_PACKAGES: a system python3 marked externally managed (PEP 668) still takes the install;
        # setup.py finds the CUDA toolkit itself (TOP= of nvcc --dryrun, /usr/local/cuda) and logs it
        DITFAST_CUDA_ARCHS=9.0 MAX_JOBS="$(nproc)" PIP_BREAK_SYSTEM_PACKAGES=1 timeout "$(left 1 30)" \
            "$PY" -m pip install -v --no-build-isolation --no-deps -e . >"$LOGS/install.log" 2>&1 ||
            { echo "pip install -e . failed (tail follows); going on from the source tree"; tail -n 20 "$LOGS/install.log"; rc=1; }
        grep -E "^ditfast setup:" "$LOGS/install.log" | head -n 8
        for whl in wheels/*.whl; do
            [ -e "$whl" ] || continue
            PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install --no-deps "$whl" >>"$LOGS/install.log" 2>&1 && echo "installed $(basename "$whl")" ||
                echo "could not install $(basename "$whl") (see install.log)"
        done
    fi
    "$PY" -m ditfast.info >"$LOGS/ditfast_info.txt" 2>&1 || true
    ext="$("$PY" -c "from ditfast import _ext; print(_ext.build_info())" 2>&1 | tail -n 1)"
    echo "ditfast._C: $ext"
    reap_sm90 "$([ "$REHEARSE" = 1 ] && echo 0 || left 1 0)"  # on a GPU machine it is done before pip is
    [ -n "$sm90_pid" ] && echo "sm_90 report: still compiling; picked up by a later tier"
    record 1 install "$([ "$rc" = 0 ] && echo ok || echo failed)" "$rc" "$ext"
    publish
else
    echo "tier 1 not selected: $("$PY" -c "from ditfast import _ext; print('ditfast._C:', _ext.build_info())" 2>&1 | tail -n 1)" |
        tee "$LOGS/install.log"
fi

# ------------------------------------------------------------------------------------------- 2 smoke
if sel 2; then
    step "2/6 smoke: every op x backend at FLUX.1-dev / SD3.5-large shapes, bf16"
    reap_sm90 0
    smoke_args=(--out "$WORK/smoke.json")
    [ "$REHEARSE" = 1 ] && smoke_args+=(--tiny)
    : >"$LOGS/smoke.log"
    for attempt in 1 2 3 4; do
        cap="$(left 2 0)"
        [ "$cap" -ge 15 ] || { echo "smoke: ${cap}s left, no further attempt"; break; }
        DITFAST_GPU_RUN_EXCLUDE="$(exclusions)" DITFAST_BENCH_DEADLINE=$(( $(date +%s) + cap - 15 )) timeout -k 5 "$cap" \
            "$PY" benchmarks/smoke.py "${smoke_args[@]}" >>"$LOGS/smoke.log" 2>&1
        rc=$?
        [ "$rc" = 3 ] || break
        culprit="$(add_culprit "$WORK/smoke.json")"
        echo "smoke: CUDA context lost at ${culprit:-?} (sticky error); rerun $(( attempt + 1 )) in a fresh process, excluding it"
        smoke_args=(--out "$WORK/smoke.json" --resume)
        [ "$REHEARSE" = 1 ] && smoke_args+=(--tiny)
        unset DITFAST_GPU_RUN_INJECT_STICKY  # the rehearsal simulates one, once
    done
    grep -E '^\[|^smoke' "$LOGS/smoke.log" | tail -n 25
    case "$rc" in
        0) record 2 smoke ok 0 ;;
        1) record 2 smoke failed 1 "rows failed or errored (summary.txt)" ;;
        124|137) if [ -s "$WORK/smoke.json" ]; then record 2 smoke stopped "$rc" "cut at its cap; smoke.json holds what ran"
                 else record 2 smoke failed "$rc" "cut at its cap before writing smoke.json"; fi ;;
        *) echo "smoke exited with $rc (see smoke.log)"; record 2 smoke failed "$rc" "exit $rc" ;;
    esac
    publish smoke.json
fi

# ------------------------------------------------------------------------------------------- 3 tests
if sel 3; then
    step "3/6 kernel and extension tests (capped in every worker; pytest's summary and XML)"
    reap_sm90 0
    cap="$(left 3 20)"
    files=()
    for f in test_modulate test_rope test_attention_kernel test_attention test_prepare test_cuda_ext; do
        [ -e "tests/$f.py" ] && files+=("tests/$f.py")
    done
    xdist=()
    [ "$REHEARSE" = 1 ] && files=(tests/test_modulate.py tests/test_rope.py)  # enough to reach the cap under the interpreter
    if "$PY" -c "import xdist" 2>/dev/null; then
        xdist=(-n "$([ "$REHEARSE" = 1 ] && echo 2 || echo 8)")
    else
        echo "pytest-xdist is not installed: one process"
    fi
    export DITFAST_TEST_CULPRITS="$LOGS/test_culprits.jsonl"
    : >"$DITFAST_TEST_CULPRITS"
    # no test starts after cap-SOFT s (each worker skips the rest: pytest ends with its summary and XML); a test
    # still running at cap-HARD s is failed by the conftest's alarm; SIGINT at cap-5 s, SIGKILL 4 s later. The
    # margins leave xdist time to stop its workers (long on a loaded 2-core machine)
    if [ "$REHEARSE" = 1 ]; then SOFT=30 HARD=20; else SOFT=15 HARD=10; fi
    timeout -s INT -k 4 "$(( cap - 5 ))" "$PY" benchmarks/run_tests.py "$(( cap - SOFT > 5 ? cap - SOFT : 5 ))" --hard "$(( cap - HARD ))" \
        -q -ra -p no:cacheprovider "${xdist[@]}" --junitxml="$LOGS/tests.xml" "${files[@]}" >"$LOGS/tests.log" 2>&1
    rc=$?
    tail -n 3 "$LOGS/tests.log"
    note=""
    if grep -q '"culprit"' "$DITFAST_TEST_CULPRITS"; then
        "$PY" benchmarks/run_tests.py lost "$DITFAST_TEST_CULPRITS" "$LOGS/tests_lost.txt" | tee -a "$LOGS/tests.log"
        cap="$(left 3 0)"
        if [ -s "$LOGS/tests_lost.txt" ] && [ "$cap" -ge 25 ]; then
            echo "rerunning the $(wc -l <"$LOGS/tests_lost.txt") tests a dead CUDA context skipped, in a fresh process"
            timeout -s INT -k 4 "$(( cap - 5 ))" "$PY" benchmarks/run_tests.py "$(( cap - SOFT ))" --hard "$(( cap - HARD ))" --only "$LOGS/tests_lost.txt" \
                -q -ra -p no:cacheprovider "${xdist[@]}" --junitxml="$LOGS/tests_rerun.xml" "${files[@]}" >"$LOGS/tests_rerun.log" 2>&1
            tail -n 2 "$LOGS/tests_rerun.log"
        fi
        note="CUDA context lost in tests (test_culprits.jsonl)"
    fi
    capped="$(grep -c "time cap reached" "$LOGS/tests.log" || true)"
    [ "${capped:-0}" -gt 0 ] && note="${note:+$note; }stopped at the ${cap}s cap"
    if [ ! -s "$LOGS/tests.xml" ]; then
        record 3 tests failed "$rc" "no JUnit XML${note:+ ($note)}"
    elif grep -qE "^(FAILED|ERROR) " "$LOGS/tests.log"; then
        record 3 tests failed "$rc" "${note:-failures (tests.log)}"
    elif grep -qE "^=* *[0-9]+ (passed|skipped|failed).* in [0-9.]+s" "$LOGS/tests.log"; then
        # rc 130 here: a signal during xdist's exit, after the summary; capped tests make the tier "stopped"
        record 3 tests "$([ "${capped:-0}" -gt 0 ] && echo stopped || echo ok)" "$rc" "pytest ended with its summary${note:+; $note}"
    elif [ "$rc" = 124 ] || [ "$rc" = 130 ] || [ "$rc" = 137 ] || [ "$rc" = 2 ]; then
        record 3 tests stopped "$rc" "interrupted at the cap; tests.xml holds what ran${note:+; $note}"
    elif [ "$rc" = 0 ] || { [ "$rc" = 5 ] && ! grep -qE "^(FAILED|ERROR) " "$LOGS/tests.log"; }; then
        record 3 tests ok "$rc" "$note"
    else
        record 3 tests failed "$rc" "${note:-failures (tests.log)}"
    fi
    publish
fi

# ------------------------------------------------------------------------------------------- 4-6 bench
bench() {  # tier name json_stem seconds args...: reruns in a fresh process after a lost CUDA context
    local tier="$1" name="$2" stem="$3" deadline_tier="$4" cap rc attempt culprit
    shift 4
    local resume=()
    : >"$LOGS/$stem.log"
    for attempt in 1 2 3; do
        cap="$(left "$deadline_tier" 0)"
        [ "$cap" -ge 15 ] || { echo "tier $tier: ${cap}s left, no further attempt"; break; }
        reap_sm90 0
        DITFAST_GPU_RUN_EXCLUDE="$(exclusions)" DITFAST_BENCH_DEADLINE=$(( $(date +%s) + cap - 10 )) timeout -s INT -k 5 "$cap" \
            "$PY" -m ditfast.bench --json "$WORK/$stem.json" "${resume[@]}" "${BENCH_ARGS[@]}" "$@" >>"$LOGS/$stem.log" 2>&1
        rc=$?
        [ "$rc" = 3 ] || break
        culprit="$(add_culprit "$WORK/$stem.json")"
        echo "tier $tier: CUDA context lost at ${culprit:-?} (sticky error); rerun in a fresh process, excluding it"
        resume=(--resume)
    done
    grep -E '^\[[0-9]+/[0-9]+\]|^results:|^plot|failed|context lost' "$LOGS/$stem.log" | tail -n 12
    [ -e "$WORK/$stem.png" ] && mv "$WORK/$stem.png" "$LOGS/"
    if [ "${rc:-1}" = 0 ]; then record "$tier" "$name" ok 0; else
        echo "tier $tier: benchmark exited with ${rc:-none} (see $stem.log)"; record "$tier" "$name" failed "${rc:-none}"; fi
}
if sel 4; then
    step "4/6 benchmark: ops and attention (no compile peers)"
    bench 4 ops bench_ops 4 --levels ops,attention --no-compile
    if [ "$REHEARSE" = 0 ] && [ -s "$WORK/bench_ops.json" ]; then
        "$PY" scripts/backend_table.py "$WORK/bench_ops.json" --table "$WORK/backend_table.json" >>"$LOGS/bench_ops.log" 2>&1 &&
            tail -n 1 "$LOGS/bench_ops.log"
    fi
    publish bench_ops.json backend_table.json
fi
if sel 5; then
    step "5/6 benchmark: blocks and the training step (no compile peers)"
    bench 5 blocks bench_blocks 5 --levels blocks,train --no-compile
    publish bench_blocks.json
fi
if sel 6; then
    step "6/6 benchmark: whole models, then the torch.compile peers of the target ops and attention"
    if [ "$(left 6 0)" -ge 30 ]; then
        # blocks' compile peers take minutes cold: not in this run (python -m ditfast.bench --levels blocks has them)
        bench 6 peers bench_peers 6 --levels models,attention,ops --quick --backends none
        publish bench_peers.json
    else
        T_START=$SECONDS
        echo "skipped: $(left 6 0)s left of the ${TOTAL}s budget"; record 6 peers skipped - "under 30 s left"
    fi
fi

# ------------------------------------------------------------------------------------------- summary
reap_sm90 "$(( TOTAL - SECONDS - 4 > 0 ? TOTAL - SECONDS - 4 : 0 ))"
[ -n "$sm90_pid" ] && { kill "$sm90_pid" 2>/dev/null; echo "sm_90 report: not finished in the budget (killed)"; sm90_pid=""; }
cp "$EXCLUDE_FILE" "$LOGS/excluded.txt" 2>/dev/null || true
printf '%s\n' "$DITFAST_BENCH_COMMIT" >"$LOGS/commit.txt"
"$PY" benchmarks/outcome.py summary "$WORK" >"$WORK/summary.txt" 2>&1 || status=1
"$PY" benchmarks/outcome.py digest "$WORK" --tiers "$TIERS" --budget "$TOTAL" --elapsed "$SECONDS" \
    --slices "${SLICES[*]}" $([ "$REHEARSE" = 1 ] && echo --rehearse) >"$LOGS/digest.txt" 2>&1 || status=1
cat "$LOGS/digest.txt" >>"$WORK/summary.txt"
publish summary.txt
if [ "$REHEARSE" = 1 ]; then
    expect=summary.txt,logs.tar.gz
    sel 2 && expect+=,smoke.json
    sel 4 && expect+=,bench_ops.json
    sel 5 && expect+=,bench_blocks.json
    sel 6 && expect+=,bench_peers.json
    "$PY" benchmarks/outcome.py check "$OUT" --expect "$expect" --tiers "$TIERS" || status=1
fi
printf '\n=== digest  (%ss elapsed, budget %ss; files in %s: %s; the full report is summary.txt)\n' \
    "$SECONDS" "$TOTAL" "$OUT" "$(ls "$OUT" | tr '\n' ' ')"
cat "$LOGS/digest.txt"
exit "$status"
