#!/usr/bin/env bash
# Runs the tests under the GPU machine's library versions -- torch 2.11.0, triton 3.6.0, numpy >= 2.4 --
# on this machine's CPU (Triton kernels under the interpreter), in a separate virtual environment.
#
#   bash scripts/test_gpu_versions.sh                      # the kernel tests (modulate, rope, attention)
#   bash scripts/test_gpu_versions.sh tests/test_blocks_backends.py -k dit    # any pytest arguments
#   ALL=1 bash scripts/test_gpu_versions.sh                # the whole suite
#
# The environment lives outside the repository by default (GPU_VERSIONS_VENV, default
# ~/.cache/ditfast/venv-torch2.11-triton3.6) and is reused by later runs. torch comes from PyTorch's CPU
# wheel index when it is reachable (about 200 MB), else from PyPI (the CUDA build, several GB; it runs on
# the CPU too). The checkout is copied (tracked and untracked, not ignored files) to a temporary folder
# and installed from there, non-editable and without the CUDA kernels (DITFAST_SKIP_CUDA_BUILD=1): the
# editable install of the main .venv, and the extension built in place for it, are never touched.
# See docs/numerics.md ("Library versions") for the interpreter work-around this combination needs.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
venv="${GPU_VERSIONS_VENV:-$HOME/.cache/ditfast/venv-torch2.11-triton3.6}"
torch_v="${GPU_TORCH_VERSION:-2.11.0}"
triton_v="${GPU_TRITON_VERSION:-3.6.0}"

if [ ! -x "$venv/bin/python" ]; then
    mkdir -p "$(dirname "$venv")"
    "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
pip_q() { "$py" -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }

have() { "$py" - "$1" "$2" <<'EOF' 2>/dev/null
import sys, importlib.metadata as md
sys.exit(0 if md.version(sys.argv[1]).split("+")[0] == sys.argv[2] else 1)
EOF
}
if ! have torch "$torch_v"; then
    # The CPU index first; a machine that cannot reach it takes PyPI's build.
    if ! pip_q --index-url https://download.pytorch.org/whl/cpu "torch==$torch_v"; then
        echo "download.pytorch.org not reachable: torch $torch_v from PyPI" >&2
        pip_q "torch==$torch_v"
    fi
fi
have triton "$triton_v" || pip_q "triton==$triton_v"
pip_q "numpy>=2.4" einops setuptools wheel ninja pybind11 pytest pytest-benchmark hypothesis "diffusers>=0.35"

# A copy of the checkout as it is now (uncommitted edits included), installed from there.
work="$(mktemp -d "${TMPDIR:-/tmp}/ditfast-gpu-versions.XXXXXX")"
trap 'rm -rf "$work"' EXIT
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [ -f "$f" ] && { mkdir -p "$work/$(dirname "$f")"; cp -p "$f" "$work/$f"; }
done
(cd "$work" && DITFAST_SKIP_CUDA_BUILD=1 MAX_JOBS="${MAX_JOBS:-2}" pip_q --no-build-isolation --no-deps .)

if [ "$#" -eq 0 ]; then
    if [ -n "${ALL:-}" ]; then set -- tests; else set -- tests/test_modulate.py tests/test_rope.py tests/test_attention.py; fi
fi
# From the copy, without its ditfast/ folder, so the tests import the installed package.
cd "$work"
rm -rf ditfast
"$py" - <<'EOF'
import numpy, torch, triton, ditfast
print(f"torch {torch.__version__}  triton {triton.__version__}  numpy {numpy.__version__}  ditfast {ditfast.__version__} ({ditfast.__file__})")
EOF
"$py" -m pytest -q -p no:cacheprovider "$@"
