"""Projections with a random basis P = s·Ω (D×d) that is never stored: Ω_ij = f(seed, i, j),
the counter-based sketch matrix of lowrank_kernels.sketch_omega (Philox4x32-10, Gaussian or
Rademacher). Here P is generated a block of rows at a time (at most ~2²² entries live)."""
import torch

from .sketch_omega import sketch_omega

_BLOCK_ENTRIES = 1 << 22


def _row_blocks(D, d, device):
    step = max(1, _BLOCK_ENTRIES // max(d, 1))
    for r0 in range(0, D, step):
        yield torch.arange(r0, min(r0 + step, D), dtype=torch.int64, device=device)


def _omega(rows, d, seed, rademacher):
    return sketch_omega(rows, d, seed, rademacher)


def random_subspace_expand(alpha, seed, D, scale, rademacher, base=None):
    """w = base + s·Ω α: α (d), Ω (D×d) from (seed, i, j) → w (D) in base's dtype (float32
    without base); float64 arithmetic for float64 inputs, else float32."""
    dtype = torch.float64 if alpha.dtype == torch.float64 else torch.float32
    a = alpha.to(dtype)
    w = torch.empty(D, dtype=dtype, device=alpha.device)
    for rows in _row_blocks(D, alpha.shape[0], alpha.device):
        w[rows[0]:rows[-1] + 1] = _omega(rows, alpha.shape[0], seed, rademacher).to(dtype) @ a
    w *= scale
    if base is not None:
        w += base.to(dtype)
    return w if base is None else w.to(base.dtype)


def random_subspace_project(g, seed, d, scale, rademacher):
    """c = s·Ωᵀ g: g (D), Ω (D×d) from (seed, i, j) → c (d), float32 (float64 for float64)."""
    dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    c = torch.zeros(d, dtype=dtype, device=g.device)
    v = g.to(dtype)
    for rows in _row_blocks(g.shape[0], d, g.device):
        c += _omega(rows, d, seed, rademacher).to(dtype).T @ v[rows[0]:rows[-1] + 1]
    return c * scale
