#!/usr/bin/env bash
# The test command: installs what the tests need (see setup_env.sh), then runs the whole suite.
# Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. scripts/setup_env.sh test
python -m pytest -q tests "$@"
