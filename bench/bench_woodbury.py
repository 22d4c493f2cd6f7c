"""woodbury_solve: X = (K + λI)⁻¹ R, ours (one fused kernel per call) vs
torch.linalg.cholesky_ex + torch.cholesky_solve (cuSOLVER on GPU, LAPACK on CPU) and vs
torch.linalg.solve (LU), each baseline including the damping add K + λI.

flops = n³/3 + 2n²r per member (Cholesky, two triangular solves); bytes = K + R + X.
"""
import pytest
import torch
from common import DEVICE, FULL, measure

import lowrank_kernels as lk

BATCHES = [1, 8, 64] if FULL else [1, 8]
SIZES = [32, 64, 128, 256, 512, 1024] if FULL else [32, 128, 512]
RHS = [1, 16]
DTYPES = [torch.float32, torch.float64]
LAMBDA = 1e-3


def _case(b, n, r, dtype):
    g = torch.Generator().manual_seed(0)
    G = torch.randn(b, n, n, generator=g, dtype=torch.float64)
    K = (G @ G.mT / n).to(DEVICE, dtype)  # a Gram: SPD up to rounding, λ makes it safe
    R = torch.randn(b, n, r, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    eye = torch.eye(n, dtype=dtype, device=DEVICE)
    shape = f"b={b} n={n} r={r} {str(dtype).replace('torch.', '')}"
    flops = b * (n ** 3 / 3 + 2 * n * n * r)
    bytes_moved = (K.numel() + 2 * R.numel()) * K.element_size()
    return K, R, eye, shape, flops, bytes_moved


def _params():
    return [pytest.param(b, n, r, d, id=f"b{b}-n{n}-r{r}-{str(d).replace('torch.', '')}")
            for d in DTYPES for b in BATCHES for n in SIZES for r in RHS]


@pytest.mark.parametrize("b,n,r,dtype", _params())
def test_woodbury_ours(benchmark, b, n, r, dtype):
    K, R, _, shape, flops, nbytes = _case(b, n, r, dtype)
    X, info, _ = lk.woodbury_solve(K, LAMBDA, R, backend="native")
    assert (info == 0).all()
    measure(benchmark, lambda: lk.woodbury_solve(K, LAMBDA, R, backend="native"),
            op="woodbury_solve", shape=shape, provider="ours (native)", flops=flops,
            bytes_moved=nbytes)


@pytest.mark.parametrize("b,n,r,dtype", _params())
def test_woodbury_cholesky(benchmark, b, n, r, dtype):
    K, R, eye, shape, flops, nbytes = _case(b, n, r, dtype)

    def run():
        L, _ = torch.linalg.cholesky_ex(K + LAMBDA * eye)
        return torch.cholesky_solve(R, L)

    name = ("cusolver" if DEVICE == "cuda" else "torch") + " cholesky_ex+cholesky_solve"
    measure(benchmark, run, op="woodbury_solve", shape=shape, provider=name, flops=flops,
            bytes_moved=nbytes, baseline=True)


@pytest.mark.parametrize("b,n,r,dtype", _params())
def test_woodbury_linalg_solve(benchmark, b, n, r, dtype):
    K, R, eye, shape, flops, nbytes = _case(b, n, r, dtype)
    measure(benchmark, lambda: torch.linalg.solve(K + LAMBDA * eye, R), op="woodbury_solve",
            shape=shape, provider="torch linalg.solve", flops=flops, bytes_moved=nbytes,
            baseline=True)
