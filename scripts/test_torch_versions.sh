#!/usr/bin/env bash
# Runs the tests under another torch release than the main .venv's, on this machine's CPU (Triton kernels
# under the interpreter), in a separate virtual environment. This is how the torch range pyproject.toml
# declares is tested (ditfast/_versions.py): CI runs the fast subset below on the oldest declared torch.
#
#   bash scripts/test_torch_versions.sh 2.11                 # oldest declared: torch 2.11.0 + triton 3.6.0 (also the
#                                                            # versions of our H100 / H200 benchmark machine)
#   bash scripts/test_torch_versions.sh 2.13                 # torch 2.13.0 (CPU build) + triton 3.7
#   bash scripts/test_torch_versions.sh 2.11 tests/test_rope.py -k qk    # any pytest arguments
#   ALL=1 bash scripts/test_torch_versions.sh 2.11           # the whole suite
#
# The fast subset: every op's forward and backward on every backend (the op, prepare, attention, kernel and
# extension test files), the op-schema check, the patch tests and the training tests (about 10 minutes
# on 2 cores).
#
# Each environment lives outside the repository (~/.cache/ditfast/venv-torch<VERSION>, or TORCH_VERSIONS_VENV)
# and is reused by later runs. torch comes from PyTorch's CPU wheel index when it answers within a few
# seconds (about 200 MB), else from PyPI (the CUDA build, a few GB; it runs on the CPU too). The checkout
# (tracked and untracked, not ignored files) is copied to a temporary folder and installed from there,
# non-editable and without the CUDA kernels (DITFAST_SKIP_CUDA_BUILD=1): the main .venv's editable
# install and the extension built in place for it are never touched.
# docs/numerics.md ("Library versions") has the interpreter work-around these versions need.
set -euo pipefail
cd "$(dirname "$0")/.."
series="${1:?usage: test_torch_versions.sh 2.11|2.13 [pytest args]}"
shift
case "$series" in
    2.11) torch_v=2.11.0; triton_spec="triton==3.6.0"; numpy_spec="numpy>=2.4";;
    2.13) torch_v=2.13.0; triton_spec="triton==3.7.*"; numpy_spec="numpy";;
    *) echo "test_torch_versions.sh: unknown torch series '$series' (known: 2.11, 2.13)" >&2; exit 2;;
esac
venv="${TORCH_VERSIONS_VENV:-$HOME/.cache/ditfast/venv-torch$series}"
# the older name of the 2.11 environment (scripts/test_gpu_versions.sh made it): reuse it if present
if [ -z "${TORCH_VERSIONS_VENV:-}" ] && [ "$series" = 2.11 ] && [ -x "$HOME/.cache/ditfast/venv-torch2.11-triton3.6/bin/python" ]; then
    venv="$HOME/.cache/ditfast/venv-torch2.11-triton3.6"
fi

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
t0=$SECONDS
if ! have torch "$torch_v"; then
    echo "== installing torch $torch_v into $venv (a few minutes the first time)"
    # The CPU index first, with a short timeout: a machine that cannot reach it takes PyPI's (or a local) build.
    if ! pip_q --timeout 5 --retries 0 --index-url https://download.pytorch.org/whl/cpu "torch==$torch_v"; then
        echo "   download.pytorch.org not reachable: torch $torch_v from the default index"
        pip_q "torch==$torch_v"
    fi
fi
pip_q "$triton_spec" "$numpy_spec" einops setuptools wheel ninja pybind11 pytest pytest-xdist hypothesis "diffusers>=0.35"

# A copy of the checkout as it is now (uncommitted edits included), installed from there.
work="$(mktemp -d "${TMPDIR:-/tmp}/ditfast-torch$series.XXXXXX")"
trap 'rm -rf "$work"' EXIT
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [ -f "$f" ] && { mkdir -p "$work/$(dirname "$f")"; cp -p "$f" "$work/$f"; }
done
echo "== building ditfast (C++ CPU kernels) for torch $torch_v"
(cd "$work" && DITFAST_SKIP_CUDA_BUILD=1 MAX_JOBS="${MAX_JOBS:-2}" pip_q --no-build-isolation --no-deps .)
echo "   environment ready after $((SECONDS - t0)) s"

if [ "$#" -eq 0 ]; then
    if [ -n "${ALL:-}" ]; then
        set -- tests
    else
        set -- tests/test_op_schemas.py tests/test_modulate.py tests/test_modulate_options.py tests/test_rope.py \
               tests/test_prepare.py tests/test_gelu.py tests/test_swiglu.py \
               tests/test_attention.py tests/test_attention_kernel.py tests/test_cuda_ext.py \
               tests/test_patch.py tests/test_training.py
    fi
fi
# From the copy, without its ditfast/ folder, so the tests import the installed package.
cd "$work"
rm -rf ditfast
"$py" - <<'EOF'
import numpy, torch, triton, ditfast
print(f"torch {torch.__version__}  triton {triton.__version__}  numpy {numpy.__version__}  ditfast {ditfast.__version__} ({ditfast.__file__})")
EOF
"$py" -m pytest -q -p no:cacheprovider "$@"
