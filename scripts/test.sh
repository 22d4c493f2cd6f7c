#!/usr/bin/env bash
# The test suite, from a fresh machine: install, build, then pytest (CPU tests with Triton
# under its interpreter when there is no GPU; `cuda`-marked tests run where a GPU is; the
# nvcc compile check of every .cu and the ctest of the kernel cores are part of it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m pytest python_tests "$@"
