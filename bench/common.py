"""What a benchmark file declares, for the runner (bench/run.py) to time.

Each bench_*.py has a list CASES of `Case`s. A case is one (op, shape): its `build()` makes the
inputs and returns a `Setup` — the providers to time against each other in the same process,
interleaved round by round:

- role "ours": the package's public op `lowrank_kernels.<op>(...)` with the default backend
  (auto); each "ours" provider is one row of the table;
- role "baseline": the best exact plain-PyTorch formulations of the same result; a row's
  speed-up is against the fastest of them (same run, same rounds);

Baselines are checked against ours on the case's inputs before anything is timed (Setup.tol,
relative to the largest entry). build() runs in the worker process, never at import.
"""
import dataclasses
import os
from collections.abc import Callable

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# LOWRANK_BENCH_FULL=1 (run.py --full) runs the full-size shapes on CPU too; GPUs always do.
FULL = DEVICE == "cuda" or os.environ.get("LOWRANK_BENCH_FULL", "0") == "1"
# A baseline that would allocate more than this is left out of its case (said in the notes).
MAX_BYTES = (8 << 30) if DEVICE == "cuda" else (2 << 30)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@dataclasses.dataclass
class Provider:
    name: str
    fn: Callable
    role: str = "baseline"  # "ours" | "baseline"
    check: bool = True  # compare its output with the (first) ours provider's
    extra: dict = dataclasses.field(default_factory=dict)  # e.g. error=..., shown in the notes


@dataclasses.dataclass
class Setup:
    providers: list
    flops: float = 0.0  # of the computation (the same for every provider of the case)
    bytes_moved: float = 0.0  # the floor: what must be read and written once
    dtype: str = "float32"  # picks the measured peak for the roofline
    tol: float = 1e-4  # max |ours - baseline| <= tol * max |baseline|
    notes: dict = dataclasses.field(default_factory=dict)
    calls: int = 1  # calls of the op inside one provider call: the table reports per call
    after: Callable | None = None  # run after timing (assertions on the providers' state)


@dataclasses.dataclass
class Case:
    op: str
    shape: str
    build: Callable  # () -> Setup
    threads: int | None = None  # torch threads (own worker process); None: the run's setting
    budget_scale: float = 1.0  # of the per-case measuring budget (slow multi-provider cases)
    env: dict = dataclasses.field(default_factory=dict)  # set while the case runs

    @property
    def id(self):
        return f"{self.op} | {self.shape}"


class Skip(Exception):
    """Raised by a build(): the case cannot run here (the reason goes in the table)."""


def ours(name, fn, **extra):
    return Provider(f"ours ({name})" if name else "ours", fn, role="ours", extra=extra)


def baseline(name, fn, check=True, **extra):
    return Provider(name, fn, role="baseline", check=check, extra=extra)


def gib(nbytes):
    return f"{nbytes / 2**30:.1f} GiB"


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")
