#!/usr/bin/env bash
# The GPU pass in one command, for a lent GPU machine (the device tool runs it in the repo
# root): build the CUDA extension, run the whole suite including the `cuda` tests, run the
# benchmark runner, and copy the logs and results to $OUT (default: gpu_out/).
#   bash scripts/gpu_validate.sh            # everything
#   BENCH_K=gram_linear bash scripts/gpu_validate.sh   # a subset of the benchmarks
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}

{ nvidia-smi; bash scripts/install.sh; } > "$OUT/build.log" 2>&1 || {
  tail -60 "$OUT/build.log"; exit 1; }
tail -25 "$OUT/build.log"
"$PY" -m pytest python_tests -q -ra -p no:cacheprovider > "$OUT/tests.log" 2>&1
echo "tests exit $?"; tail -40 "$OUT/tests.log"
"$PY" bench/run.py ${BENCH_K:+-k "$BENCH_K"} > "$OUT/bench.log" 2>&1
echo "bench exit $?"; tail -60 "$OUT/bench.log"
for f in bench/results/*/results*.{md,json,png}; do
  [ -f "$f" ] && cp "$f" "$OUT/$(basename "$(dirname "$f")")-$(basename "$f")"
done
ls -la "$OUT"
