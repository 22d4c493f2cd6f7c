#!/usr/bin/env bash
# The main job, from a fresh machine: install, build, then the benchmark runner (ours vs
# cuBLAS/cuSOLVER/PyTorch baselines; table, JSON and plot under bench/results/<device>/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" bench/run.py "$@"
