#!/usr/bin/env bash
# The main job, from a fresh machine: install, build, then the benchmark runner (ours vs the
# best exact PyTorch / cuBLAS / cuSOLVER formulations, interleaved in one process per case;
# table, JSON, log and plot under bench/results/<device>/, rewritten after every case).
#   bash scripts/bench.sh                   # reduced shapes on CPU: minutes (a progress bar, ETA)
#   bash scripts/bench.sh --full            # the full sweep (or LOWRANK_BENCH_FULL=1)
#   bash scripts/bench.sh -k woodbury       # a subset; python bench/run.py --help for the rest
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" bench/run.py "$@"
