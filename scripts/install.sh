#!/usr/bin/env bash
# Install what lowrank_kernels needs on this machine and build it in place (editable).
# Keeps an installed torch (CPU or CUDA build) as it is; where there is none, installs the
# CPU build torch==2.13.0 (with triton 3.9.0 for the Triton interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[install] no torch found: installing the CPU build torch==2.13.0"
  "$PY" -m pip install -q torch==2.13.0
fi
if ! "$PY" -c "import triton" 2>/dev/null; then
  echo "[install] no triton found: installing triton==3.9.0"
  "$PY" -m pip install -q triton==3.9.0
fi
# Build and test tools, and what the examples and benchmarks use (scikit-learn: the digits
# data set; matplotlib: plots; tqdm: progress bars). None of them replaces torch.
"$PY" -m pip install -q "setuptools>=70" wheel ninja pybind11 numpy pytest pytest-benchmark \
  scikit-learn matplotlib tqdm
command -v cmake >/dev/null 2>&1 || "$PY" -m pip install -q cmake

# --no-build-isolation: build against the torch installed above, never a fresh one.
"$PY" -m pip install -q --no-build-isolation -e .
"$PY" -m lowrank_kernels
