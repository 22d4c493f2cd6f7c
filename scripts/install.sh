#!/usr/bin/env bash
# Install what lowrank_kernels needs on this machine and build it in place (editable).
# Keeps an installed torch (CPU or CUDA build) as it is; where there is none, installs the
# CPU build torch==2.13.0 (with triton 3.9.0 for the Triton interpreter). Packages already
# importable are left alone, so a machine that has everything (a GPU image without network)
# installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

has() { "$PY" -c "import $1" 2>/dev/null; }

if ! has torch; then
  echo "[install] no torch found: installing the CPU build torch==2.13.0"
  "$PY" -m pip install -q torch==2.13.0
fi
if ! has triton; then
  echo "[install] no triton found: installing triton==3.9.0"
  "$PY" -m pip install -q triton==3.9.0
fi
# Build and test tools, and what the examples and benchmarks use (scikit-learn: the digits
# data set; matplotlib: plots; tqdm: progress bars). None of them replaces torch.
missing=()
for pair in "wheel:wheel" "ninja:ninja" "pybind11:pybind11" \
            "numpy:numpy" "pytest:pytest" "pytest_benchmark:pytest-benchmark" \
            "sklearn:scikit-learn" "matplotlib:matplotlib" "tqdm:tqdm"; do
  has "${pair%%:*}" || missing+=("${pair#*:}")
done
if "$PY" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 70)" 2>/dev/null; then
  :
else
  missing+=("setuptools>=70")
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "[install] installing: ${missing[*]}"
  "$PY" -m pip install -q "${missing[@]}"
fi
command -v cmake >/dev/null 2>&1 || "$PY" -m pip install -q cmake

# --no-build-isolation: build against the torch installed above, never a fresh one.
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" -m lowrank_kernels
