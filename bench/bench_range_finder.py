"""Randomized range finder and randomized SVD: ours (Ω generated inside the sketch GEMM,
Cholesky-QR2 orthonormalization) vs torch.svd_lowrank (and its range finder,
torch._lowrank.get_approximate_basis) and vs the textbook torch.randn + matmul +
Householder QR. Every row reports the time, the accuracy ‖M − QQᵀM‖_F/‖M‖_F (or
‖M − U S Vᵀ‖_F/‖M‖_F for the SVD) in extra_info['error'], and the peak extra memory.

M = G₁ diag(σ) G₂ with Gaussian G₁, G₂ and σ_j = 1/(1 + j): a slowly decaying spectrum, on
which power iterations (q) visibly pay off. Sketch size l = k + 10 for every provider.
"""
import pytest
import torch
import torch._lowrank
from common import DEVICE, FULL, measure

import lowrank_kernels as lk

SHAPES = [(4096, 4096), (4096, 14336)] if FULL else [(512, 384), (384, 1024)]
RANKS = [32, 128, 256] if FULL else [16, 64]
POWER_ITERS = [0, 1, 2]
OVERSAMPLE = 10
OURS = "triton" if DEVICE == "cuda" else "native"

_CACHE = {}


def _matrix(m, n):
    if (m, n) not in _CACHE:
        g = torch.Generator(device=DEVICE).manual_seed(0)
        r = min(m, n)
        sigma = 1.0 / (1.0 + torch.arange(r, dtype=torch.float32, device=DEVICE))
        G1 = torch.randn(m, r, generator=g, device=DEVICE) / m ** 0.5
        G2 = torch.randn(r, n, generator=g, device=DEVICE) / n ** 0.5
        _CACHE.clear()  # one matrix at a time on the device
        _CACHE[(m, n)] = (G1 * sigma) @ G2
    return _CACHE[(m, n)]


def _projection_error(M, Q):
    return float(torch.linalg.matrix_norm(M - Q @ (Q.T @ M)) / torch.linalg.matrix_norm(M))


def _svd_error(M, U, S, V):
    return float(torch.linalg.matrix_norm(M - (U * S) @ V.T) / torch.linalg.matrix_norm(M))


def _flops(m, n, l, q):
    # (2q + 1) products with M, plus the orthonormalizations (≈ 4 m l² each, Cholesky-QR2).
    return 2.0 * m * n * l * (2 * q + 1) + (2 * q + 1) * 4.0 * max(m, n) * l * l


def _textbook_range_finder(M, l, q):
    """HMT Alg. 4.4 with torch: Ω = randn, Y = M Ω, Householder QR after every product."""
    Q = torch.linalg.qr(M @ torch.randn(M.shape[1], l, device=M.device, dtype=M.dtype)).Q
    for _ in range(q):
        Z = torch.linalg.qr(M.T @ Q).Q
        Q = torch.linalg.qr(M @ Z).Q
    return Q


RANGE_PROVIDERS = {
    f"ours ({OURS})": lambda M, k, q: lk.range_finder(M, k, oversample=OVERSAMPLE,
                                                      power_iters=q, backend=OURS),
    "torch.svd_lowrank basis": lambda M, k, q: torch._lowrank.get_approximate_basis(
        M, k + OVERSAMPLE, niter=q),
    "torch randn+matmul+qr": lambda M, k, q: _textbook_range_finder(M, k + OVERSAMPLE, q),
}

SVD_PROVIDERS = {
    f"ours ({OURS})": lambda M, k, q: lk.randomized_svd(M, k, oversample=OVERSAMPLE,
                                                        power_iters=q, backend=OURS),
    "torch.svd_lowrank": lambda M, k, q: _truncated(torch.svd_lowrank(M, q=k + OVERSAMPLE,
                                                                      niter=q), k),
}


def _truncated(usv, k):
    """torch.svd_lowrank returns all k + 10 triplets; keep the top k, as ours returns."""
    U, S, V = usv
    return U[:, :k], S[:k], V[:, :k]


def _case(m, n, k, q):
    return _matrix(m, n), f"{m}x{n} k={k} q={q} fp32", _flops(m, n, k + OVERSAMPLE, q)


@pytest.mark.parametrize("provider", list(RANGE_PROVIDERS))
@pytest.mark.parametrize("q", POWER_ITERS)
@pytest.mark.parametrize("k", RANKS)
@pytest.mark.parametrize("m,n", SHAPES)
def test_range_finder(benchmark, m, n, k, q, provider):
    M, shape, flops = _case(m, n, k, q)
    fn = RANGE_PROVIDERS[provider]
    error = _projection_error(M, fn(M, k, q))
    measure(benchmark, lambda: fn(M, k, q), op="range_finder", shape=shape, provider=provider,
            flops=flops, bytes_moved=(2 * q + 1) * M.numel() * 4,
            baseline=not provider.startswith("ours"), error=error)


@pytest.mark.parametrize("provider", list(SVD_PROVIDERS))
@pytest.mark.parametrize("q", POWER_ITERS)
@pytest.mark.parametrize("k", RANKS)
@pytest.mark.parametrize("m,n", SHAPES)
def test_randomized_svd(benchmark, m, n, k, q, provider):
    M, shape, flops = _case(m, n, k, q)
    fn = SVD_PROVIDERS[provider]
    U, S, V = fn(M, k, q)
    error = _svd_error(M, U, S, V)
    measure(benchmark, lambda: fn(M, k, q), op="randomized_svd", shape=shape,
            provider=provider, flops=flops + 2.0 * m * n * (k + OVERSAMPLE),
            bytes_moved=(2 * q + 2) * M.numel() * 4,
            baseline=not provider.startswith("ours"), error=error)
