# Sourced by scripts/test.sh and scripts/bench.sh: makes ./.venv (unless a virtualenv is already
# active), installs torch if it is missing, and installs this checkout with the given extras -- saying
# what it installs or compiles and how long that took, and skipping what is already done.
#
# Knobs (environment):
#   DITFAST_TORCH_VERSION   torch to install when none is importable (default 2.14.1: the CUDA 13.0 build,
#                           ~3 GB with its CUDA libraries; with nvcc present the CUDA kernels of
#                           ditfast._C compile even on a machine without a GPU)
#   DITFAST_TORCH_INDEX     a pip index for torch, e.g. https://download.pytorch.org/whl/cpu for a CPU-only
#                           build (~200 MB; DITFAST_TORCH_VERSION=2.13.0 is the newest there)
#   DITFAST_FORCE_INSTALL=1 run `pip install -e` even when nothing changed (DITFAST_FORCE_BUILD=1: also
#                           recompile ditfast._C)
#   CUDA_HOME, DITFAST_CUDA_ARCHS, MAX_JOBS (default 2), DITFAST_SKIP_CUDA_BUILD: see setup.py
# An unchanged checkout is not installed again: the stamp $VIRTUAL_ENV/.ditfast-install records the
# hash of what ditfast._C is built from (setup.py --source-hash: csrc/, setup.py, torch, switches), of
# pyproject.toml and of the extras; and setup.py itself keeps an up-to-date ditfast._C when pip runs.
set -euo pipefail
extras="${1:-test}"
_t0=$SECONDS
say() { printf '[setup %3ss] %s\n' "$(( SECONDS - _t0 ))" "$*"; }
if [ -z "${VIRTUAL_ENV:-}" ]; then
    if [ ! -x .venv/bin/python ]; then
        say "creating the virtualenv ./.venv"
        "${PYTHON:-python3}" -m venv .venv
    fi
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
# pip's own failure fails the script (pipefail); only grep's "no line left" is forgiven
pip_q() { python -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
if ! python -c "import torch" 2>/dev/null; then
    tv="${DITFAST_TORCH_VERSION:-2.14.1}"
    if [ -n "${DITFAST_TORCH_INDEX:-}" ]; then
        say "installing torch==$tv from $DITFAST_TORCH_INDEX (a CPU-only build: ~200 MB, about a minute)"
        pip_q --index-url "$DITFAST_TORCH_INDEX" "torch==$tv"
    else
        say "installing torch==$tv from PyPI (the CUDA build: ~3 GB with its CUDA libraries, 2-5 minutes;"
        say "  DITFAST_TORCH_INDEX=https://download.pytorch.org/whl/cpu DITFAST_TORCH_VERSION=2.13.0 is the CPU-only one)"
        pip_q "torch==$tv"
    fi
    say "torch $(python -c 'import torch; print(torch.__version__)') installed"
fi
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export MAX_JOBS="${MAX_JOBS:-2}"
stamp_file="${VIRTUAL_ENV:-.venv}/.ditfast-install"
stamp="$(python setup.py --source-hash 2>/dev/null || echo none) $(python -c 'import hashlib,sys; print(hashlib.sha256(open("pyproject.toml","rb").read()).hexdigest()[:16])') [$extras] $PWD"
if [ -z "${DITFAST_FORCE_INSTALL:-}${DITFAST_FORCE_BUILD:-}" ] && [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] &&
        python -c "import ditfast, ditfast._C" 2>/dev/null; then
    say "ditfast is installed and up to date (csrc/, setup.py, torch, pyproject.toml and extras [$extras] unchanged): no pip install"
else
    rm -f "$stamp_file"
    say "installing the build tools (setuptools, wheel, ninja, pybind11)"
    pip_q setuptools wheel ninja pybind11
    if python -c "import ditfast._build_info as b, sys; sys.exit(0 if getattr(b, 'SOURCE_HASH', None) == sys.argv[1] else 1)" \
            "$(python setup.py --source-hash 2>/dev/null)" 2>/dev/null && [ -z "${DITFAST_FORCE_BUILD:-}" ]; then
        say "pip install -e .[$extras]: ditfast._C is up to date, not compiled again (less than a minute)"
    elif python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" && [ -z "${DITFAST_SKIP_CUDA_BUILD:-}" ] &&
            { [ -n "${CUDA_HOME:-}" ] || command -v nvcc >/dev/null; }; then
        say "pip install -e .[$extras], compiling ditfast._C: C++ CPU kernels + CUDA kernels for ${DITFAST_CUDA_ARCHS:-8.0;9.0}" \
            "with MAX_JOBS=$MAX_JOBS (about 4 minutes on 2 cores, 1 minute on 16)"
    else
        say "pip install -e .[$extras], compiling ditfast._C: the C++ CPU kernels (about 1-2 minutes on 2 cores)"
    fi
    pip_q --no-build-isolation -e ".[${extras}]"
    echo "$stamp" >"$stamp_file"
fi
python -c "import ditfast" || { echo "ditfast failed to install" >&2; exit 1; }
say "ready: $(python -c 'from ditfast import _ext; print("ditfast._C:", _ext.build_info())' 2>/dev/null || echo 'ditfast imports')"
