#!/usr/bin/env bash
# The install path without a CUDA toolkit: build a wheel with CUDA_HOME pointing nowhere and nvcc off
# PATH, install it into a scratch folder, and check that it carries the CPU-only extension and that
# `import ditfast` reports the missing CUDA kernels instead of failing. Run by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
# the environment's interpreter as an absolute path (the steps below run in other folders)
py="${DITFAST_CHECK_PYTHON:-${VIRTUAL_ENV:-.venv}/bin/python}"
py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cp -r ditfast csrc setup.py pyproject.toml README.md MANIFEST.in "$tmp/"
rm -f "$tmp"/ditfast/*.so "$tmp/ditfast/_build_info.py"
(cd "$tmp" && CUDA_HOME=/nonexistent PATH="/usr/bin:/bin" MAX_JOBS="${MAX_JOBS:-2}" \
    "$py" -m pip wheel -q --no-build-isolation --no-deps . -w "$tmp/wheel" 2>&1 | { grep -v "^WARNING: Location" || true; })
"$py" -m pip install -q --no-deps --target "$tmp/site" "$tmp"/wheel/ditfast-*.whl 2>&1 | { grep -v "^WARNING: Location" || true; }
mkdir "$tmp/run"
(cd "$tmp/run" && PYTHONPATH="$tmp/site" "$py" - <<'PY'
import ditfast, ditfast._C as C
from ditfast import _backend, _ext
assert ditfast.__file__.startswith(__import__("os").environ["PYTHONPATH"]), ditfast.__file__
assert tuple(C.DEVICES) == ("cpu",), C.DEVICES
ok_cpu, _ = _backend.availability("cuda", "cpu")
ok_gpu, why = _backend.availability("cuda", "cuda")
assert ok_cpu and not ok_gpu, (ok_cpu, ok_gpu, why)
print("install without nvcc: CPU-only ditfast._C;", _ext.build_info(), "| cuda on GPU tensors:", why)
PY
)
