# Sourced by scripts/test.sh and scripts/bench.sh: makes ./.venv (unless a virtualenv is already
# active), installs torch if it is missing, and installs this checkout with the given extras.
# torch 2.14.1 is the pin on a fresh machine: it is the CUDA 13.0 build, so with nvcc present
# (CUDA_HOME, default /usr/local/cuda) setup.py compiles the ditfast._C extension even on a machine
# without a GPU, and it brings Triton, whose interpreter runs the kernels' tests on CPU.
set -euo pipefail
extras="${1:-test}"
if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
# pip's own failure fails the script (pipefail); only grep's "no line left" is forgiven
pip_q() { python -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
python -c "import torch" 2>/dev/null || pip_q "torch==${DITFAST_TORCH_VERSION:-2.14.1}"
pip_q setuptools wheel ninja pybind11
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export MAX_JOBS="${MAX_JOBS:-2}"
pip_q --no-build-isolation -e ".[${extras}]"
python -c "import ditfast" || { echo "ditfast failed to install" >&2; exit 1; }
