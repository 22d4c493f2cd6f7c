"""Randomized range finder and randomized SVD: ours (lowrank_kernels.range_finder /
randomized_svd, backend auto) against torch.svd_lowrank (and its range finder,
torch._lowrank.get_approximate_basis) and the textbook torch.randn + matmul + Householder QR.
Every row's notes give the accuracy of ours and of the best baseline, ‖M − QQᵀM‖_F/‖M‖_F
(or ‖M − U S Vᵀ‖_F/‖M‖_F for the SVD): the outputs are random, so they are compared by
accuracy, not entry by entry — the mean over DRAWS sketches (ours: seeds 0, 1, ...; torch:
torch.manual_seed(0), (1), ... before each), since one draw's error varies by a few percent.

M = G₁ diag(σ) G₂ with Gaussian G₁, G₂ and σ_j = 1/(1 + j): a slowly decaying spectrum, on
which power iterations (q) visibly pay off. Sketch size l = k + 10 for every provider.
"""
import torch
import torch._lowrank
from common import DEVICE, FULL, Case, Setup, baseline, ours

import lowrank_kernels as lk

SHAPES = [(4096, 4096), (4096, 14336)] if FULL else [(512, 384), (384, 1024)]
RANKS = [32, 128, 256] if FULL else [16, 64]
POWER_ITERS = [0, 1, 2] if FULL else [0, 2]
OVERSAMPLE = 10
DRAWS = 8


def _matrix(m, n):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    r = min(m, n)
    sigma = 1.0 / (1.0 + torch.arange(r, dtype=torch.float32, device=DEVICE))
    G1 = torch.randn(m, r, generator=g, device=DEVICE) / m ** 0.5
    G2 = torch.randn(r, n, generator=g, device=DEVICE) / n ** 0.5
    return (G1 * sigma) @ G2


def _projection_error(M, Q):
    return float(torch.linalg.matrix_norm(M - Q @ (Q.T @ M)) / torch.linalg.matrix_norm(M))


def _svd_error(M, usv):
    U, S, V = usv
    return float(torch.linalg.matrix_norm(M - (U * S) @ V.T) / torch.linalg.matrix_norm(M))


def _mean_error(error, M, run):
    """Mean of error(M, run(seed)) over DRAWS seeds (torch's global RNG seeded too)."""
    total = 0.0
    for seed in range(DRAWS):
        torch.manual_seed(seed)
        total += error(M, run(seed))
    return total / DRAWS


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


def _truncated(usv, k):
    """torch.svd_lowrank returns all k + 10 triplets; keep the top k, as ours returns."""
    U, S, V = usv
    return U[:, :k], S[:k], V[:, :k]


def _range_finder(m, n, k, q):
    def build():
        M = _matrix(m, n)
        l = k + OVERSAMPLE
        mine = lambda seed=0: lk.range_finder(M, k, oversample=OVERSAMPLE, power_iters=q,
                                              seed=seed)
        svd_basis = lambda seed=0: torch._lowrank.get_approximate_basis(M, l, niter=q)
        textbook = lambda seed=0: _textbook_range_finder(M, l, q)
        err = lambda run: _mean_error(_projection_error, M, run)
        return Setup([ours("", mine, error=err(mine)),
                      baseline("torch.svd_lowrank basis", svd_basis, check=False,
                               error=err(svd_basis)),
                      baseline("torch randn+matmul+qr", textbook, check=False,
                               error=err(textbook))],
                     flops=_flops(m, n, l, q), bytes_moved=(2 * q + 1) * M.numel() * 4)
    return build


def _randomized_svd(m, n, k, q):
    def build():
        M = _matrix(m, n)
        l = k + OVERSAMPLE
        mine = lambda seed=0: lk.randomized_svd(M, k, oversample=OVERSAMPLE, power_iters=q,
                                                seed=seed)
        svd = lambda seed=0: _truncated(torch.svd_lowrank(M, q=l, niter=q), k)
        return Setup([ours("", mine, error=_mean_error(_svd_error, M, mine)),
                      baseline("torch.svd_lowrank", svd, check=False,
                               error=_mean_error(_svd_error, M, svd))],
                     flops=_flops(m, n, l, q) + 2.0 * m * n * l,
                     bytes_moved=(2 * q + 2) * M.numel() * 4)
    return build


CASES = [Case(op, f"{m}x{n} k={k} q={q} fp32", make(m, n, k, q))
         for op, make in (("range_finder", _range_finder), ("randomized_svd", _randomized_svd))
         for m, n in SHAPES for k in RANKS for q in POWER_ITERS]
