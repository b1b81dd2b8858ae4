#!/usr/bin/env bash
# The tests under our benchmark GPU machine's library versions (torch 2.11.0, triton 3.6.0, numpy >= 2.4),
# which are also the oldest ditfast declares: scripts/test_torch_versions.sh 2.11 (read it for the details).
#
#   bash scripts/test_gpu_versions.sh                      # the fast subset (every op, patch, training)
#   bash scripts/test_gpu_versions.sh tests/test_blocks_backends.py -k dit    # any pytest arguments
#   ALL=1 bash scripts/test_gpu_versions.sh                # the whole suite
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${GPU_VERSIONS_VENV:-}" ]; then export TORCH_VERSIONS_VENV="$GPU_VERSIONS_VENV"; fi
exec bash scripts/test_torch_versions.sh 2.11 "$@"
