"""Per-call cost of the public API over the op it runs: a tiny gram_linear (B = 8,
d_in = d_out = 4, float32) and a tiny woodbury_solve (n = 8, r = 2, float64) through
lowrank_kernels.<op>(...) (backend auto: the Python wrapper's argument handling and result
type) against torch.ops.lowrank_kernels.<op> called directly (the dispatcher and the
registered kernel, the floor of a call). A provider call is CALLS calls back to back, so the
table's times are per call and the notes give the overhead per call.
One torch thread (a worker of its own when the run uses more): what is measured is Python and
dispatch, not BLAS.
"""
import torch
from common import DEVICE, Case, Setup, Skip, baseline, ours

import lowrank_kernels as lk

CALLS = 200


def _op(name):
    """torch.ops.lowrank_kernels.<name>.default, or Skip."""
    packet = getattr(torch.ops.lowrank_kernels, name, None)
    if packet is None:
        raise Skip(f"no torch.ops.lowrank_kernels.{name}")
    return packet.default


def _loop(fn):
    def run():
        for _ in range(CALLS):
            out = fn()
        return out
    return run


def _gram_linear():
    op = _op("gram_linear")
    g = torch.Generator().manual_seed(0)
    A = torch.randn(8, 4, generator=g).to(DEVICE)
    E = torch.randn(8, 4, generator=g).to(DEVICE)
    return Setup([ours("lk.gram_linear", _loop(lambda: lk.gram_linear(A, E))),
                  baseline("torch.ops.lowrank_kernels.gram_linear",
                           _loop(lambda: op(A, E, False, None, None, False, "auto")))],
                 calls=CALLS, tol=1e-6)


def _woodbury_solve():
    op = _op("woodbury_solve")
    g = torch.Generator().manual_seed(0)
    G = torch.randn(8, 8, generator=g, dtype=torch.float64)
    K = (G @ G.T / 8 + torch.eye(8, dtype=torch.float64)).to(DEVICE)
    R = torch.randn(8, 2, generator=g, dtype=torch.float64).to(DEVICE)
    lam = torch.scalar_tensor(1e-3, dtype=torch.float64)
    return Setup([ours("lk.woodbury_solve", _loop(lambda: lk.woodbury_solve(K, 1e-3, R))),
                  baseline("torch.ops.lowrank_kernels.woodbury_solve",
                           _loop(lambda: op(K, lam, R, None, 4)[0]))],
                 calls=CALLS, tol=1e-12)


CASES = [Case("dispatch gram_linear", "B=8 d=4x4 float32", _gram_linear, threads=1),
         Case("dispatch woodbury_solve", "n=8 r=2 float64", _woodbury_solve, threads=1)]
