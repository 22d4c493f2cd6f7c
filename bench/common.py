"""Shared pieces of the micro-benchmarks: the device, shape sets, and how a measurement is
labelled so the runner (bench/run.py) can put ours and the baselines side by side.

Every benchmark calls `measure(benchmark, fn, op=..., shape=..., provider=..., flops=...,
bytes_moved=..., baseline=...)`: one pytest-benchmark group per (op, shape), one row per
provider ("ours" for the package's op, anything else a baseline such as "torch" or "cublas").
"""
import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# LOWRANK_BENCH_FULL=1 runs the full-size shapes on CPU too (slow); GPUs always do.
FULL = DEVICE == "cuda" or os.environ.get("LOWRANK_BENCH_FULL", "0") == "1"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def measure(benchmark, fn, *, op, shape, provider, flops=0.0, bytes_moved=0.0,
            baseline=False, peak_extra_bytes=None, dtype="float32", **extra):
    """Time fn() (synchronized) under pytest-benchmark, labelled for the runner.
    dtype picks the peak the runner's roofline uses for the flops (float32, float64,
    bfloat16/float16); extra (e.g. error=...) is shown in the table."""
    dtype = str(dtype).replace("torch.", "")
    def run():
        out = fn()
        sync()
        return out

    run()  # warm-up: compilation, autotuning, allocator
    if DEVICE == "cuda" and peak_extra_bytes is None:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        peak_extra_bytes = torch.cuda.max_memory_allocated() - base
    benchmark.group = f"{op} {shape}"
    benchmark.extra_info.update(op=op, shape=shape, provider=provider, flops=float(flops),
                                bytes=float(bytes_moved), baseline=bool(baseline),
                                device=DEVICE, peak_extra_bytes=peak_extra_bytes, dtype=dtype,
                                **extra)
    rounds = 20 if DEVICE == "cuda" else 3
    return benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
