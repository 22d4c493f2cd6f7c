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

# Test-only model libraries (python_tests/test_models_*.py), each with --no-deps so that pip
# never replaces torch, and their small pure-Python dependencies by name. transformers 5.24
# and timm 1.0.31 run on torch 2.13. torchvision 0.28.0 (the release matching torch 2.13) is
# served only as a CUDA build whose native ops cannot load next to the CPU torch: it goes to
# its own folder, off sys.path (transformers imports torchvision whenever it is installed),
# and python_tests/model_checks.py imports its pure-Python model zoo from there.
missing=()
for pair in "transformers:transformers==5.24.0" "timm:timm==1.0.31" \
            "huggingface_hub:huggingface_hub==2.4.0" "safetensors:safetensors" \
            "tokenizers:tokenizers" "regex:regex" "yaml:pyyaml" "filelock:filelock" \
            "fsspec:fsspec" "packaging:packaging" "httpx2:httpx2" "httpcore2:httpcore2" \
            "h11:h11" "anyio:anyio" "idna:idna" "truststore:truststore" "hf_xet:hf-xet" \
            "typer:typer" "click:click" "rich:rich" "shellingham:shellingham" \
            "annotated_doc:annotated-doc" "markdown_it:markdown-it-py" "mdurl:mdurl"; do
  has "${pair%%:*}" || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[install] installing (test-only, --no-deps): ${missing[*]}"
  "$PY" -m pip install -q --no-deps "${missing[@]}" || echo "[install] test-only model libraries not installed (their tests skip)"
fi
TV_DIR=${LK_TORCHVISION_DIR:-$HOME/.cache/lowrank_kernels/torchvision}
if ! has torchvision && [ ! -d "$TV_DIR/torchvision" ]; then
  tv=$("$PY" -c "import torch; v = torch.__version__.split('+')[0].split('.'); print(f'0.{int(v[1]) + 15}.0')")
  echo "[install] installing torchvision==$tv (test-only, --no-deps) into $TV_DIR"
  "$PY" -m pip install -q --no-deps --target "$TV_DIR" "torchvision==$tv" || echo "[install] torchvision not installed (its tests skip)"
fi

# --no-build-isolation: build against the torch installed above, never a fresh one.
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" -m lowrank_kernels
