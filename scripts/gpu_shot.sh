#!/usr/bin/env bash
# Prepares the GPU run (docs/gpu-run.md): refuses a tree that differs from its commit, and prints the exact
# command to run on the GPU machine, with the commit and the hash of the files that will run there.
#
#   bash scripts/gpu_shot.sh [--tiers 2,4] [--seconds S] [--device-tool]
#
# The copy of the checkout that reaches a GPU machine often has no .git (a copied tree, a container
# image): the commit must then travel as DITFAST_BENCH_COMMIT, and DITFAST_BENCH_TREE lets
# benchmarks/gpu_run.sh check that the files it runs are that commit's (benchmarks/outcome.py tree-hash
# hashes the same files on both sides). --device-tool prints the call for this project's device tool.
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
tool=0
while [ $# -gt 0 ]; do
    case "$1" in
        --tiers|--seconds) args+=("$1" "$2"); shift 2 ;;
        --device-tool) tool=1; shift ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
dirty="$(git status --porcelain --untracked-files=normal)"
if [ -n "$dirty" ]; then
    echo "refused: the working tree differs from HEAD (commit or stash first; untracked files travel too):" >&2
    echo "$dirty" | head -n 20 >&2
    exit 1
fi
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] && py=.venv/bin/python
commit="$(git rev-parse HEAD)"
tree="$("$py" benchmarks/outcome.py tree-hash .)"
# the files hashed must be the ones that travel: no git-ignored file inside the hashed folders
ignored="$(comm -23 <("$py" -c "import sys; sys.path.insert(0, 'benchmarks'); import outcome; print('\n'.join(outcome.tree_files('.')))" | sort) \
                    <(git ls-files | sort))"
if [ -n "$ignored" ]; then
    echo "refused: files hashed here that git does not track (they would not travel):" >&2
    echo "$ignored" | head -n 20 >&2
    exit 1
fi
wheels=""
ls wheels/*.whl >/dev/null 2>&1 && wheels=", carry=[\"wheels\"]"
cmd="DITFAST_BENCH_COMMIT=$commit DITFAST_BENCH_TREE=$tree bash benchmarks/gpu_run.sh ${args[*]:+${args[*]} }"
echo "commit $commit, files $tree ($(git log -1 --format=%s | cut -c1-70))"
if [ "$tool" = 1 ]; then
    echo "run(command=\"$cmd\$OUT\"$wheels, timeout_s=560)"
else
    echo "on the GPU machine, in a copy of this commit:"
    echo "  $cmd OUT_DIR"
fi
