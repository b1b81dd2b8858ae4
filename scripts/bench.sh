#!/usr/bin/env bash
# The main job: installs ditfast with the benchmark extras and runs the benchmark suite on whatever
# device is present (a labelled CPU smoke without a GPU). Extra arguments go to `python -m ditfast.bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. scripts/setup_env.sh test,bench
python -m ditfast.bench "$@"
