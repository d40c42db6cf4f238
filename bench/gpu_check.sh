#!/usr/bin/env bash
# The GPU benchmark set in one command (see bench/gpu_check.py): JSON lines under $OUT.
#   bash bench/gpu_check.sh                  # on the GPU machine (DEV=cuda), < 5 minutes
#   DEV=cpu SMOKE=1 bash bench/gpu_check.sh  # dry run on the CPU with tiny shapes
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
