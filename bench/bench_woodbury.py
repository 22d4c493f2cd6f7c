"""woodbury_solve: X = (K + λI)⁻¹ R for a batch of SPD K, ours (lowrank_kernels.woodbury_solve,
backend auto) against torch.linalg.cholesky_ex + torch.cholesky_solve (LAPACK on CPU,
cuSOLVER on GPU) and torch.linalg.solve (LU), each baseline forming K + λI on a copy of K's
diagonal.

flops = n³/3 + 2n²r per member (Cholesky, two triangular solves); bytes = K + R + X.
"""
import torch
from common import DEVICE, FULL, Case, Setup, baseline, dtype_name, ours

import lowrank_kernels as lk

BATCHES = [1, 8, 64] if FULL else [1, 8]
SIZES = [32, 64, 128, 256, 512, 1024] if FULL else [32, 128, 512]
RHS = [1, 16]
DTYPES = [torch.float32, torch.float64]
LAMBDA = 1e-3


def _case(b, n, r, dtype):
    def build():
        g = torch.Generator().manual_seed(0)
        G = torch.randn(b, n, n, generator=g, dtype=torch.float64)
        K = (G @ G.mT / n).to(DEVICE, dtype)  # a Gram: SPD up to rounding, λ makes it safe
        R = torch.randn(b, n, r, generator=g, dtype=torch.float64).to(DEVICE, dtype)
        assert (lk.woodbury_solve(K, LAMBDA, R).info == 0).all()

        def damped():
            Kd = K.clone()
            Kd.diagonal(dim1=-2, dim2=-1).add_(LAMBDA)
            return Kd

        def cholesky():
            L, _ = torch.linalg.cholesky_ex(damped())
            return torch.cholesky_solve(R, L)

        return Setup([ours("", lambda: lk.woodbury_solve(K, LAMBDA, R)),
                      baseline("torch cholesky_ex + cholesky_solve", cholesky),
                      baseline("torch linalg.solve", lambda: torch.linalg.solve(damped(), R))],
                     flops=b * (n ** 3 / 3 + 2 * n * n * r),
                     bytes_moved=(K.numel() + 2 * R.numel()) * K.element_size(),
                     dtype=dtype_name(dtype), tol=1e-2 if dtype == torch.float32 else 1e-9)
    return build


CASES = [Case("woodbury_solve", f"b={b} n={n} r={r} {dtype_name(d)}", _case(b, n, r, d))
         for d in DTYPES for b in BATCHES for n in SIZES for r in RHS]
