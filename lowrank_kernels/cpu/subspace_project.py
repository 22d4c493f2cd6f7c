"""CPU subspace_project / subspace_expand with a stored basis P (D×k): c = Pᵀ g and w = base + P α as one
BLAS GEMV (addmv) when P is already in the accumulation dtype; a low-precision P is converted
in row blocks that stay in cache (P read once, at its own width), never as a whole copy."""
import torch

from ._common import acc_dtype

# Entries of P converted to the accumulation dtype at a time.
_BLOCK_ENTRIES = 1 << 18


def _row_step(k):
    return max(1, _BLOCK_ENTRIES // max(k, 1))


def subspace_project(P, g):
    """c = Pᵀ g: P (D×k), g (D) → c (k), float32 (float64 when an input is float64)."""
    dtype = acc_dtype(P, g)
    v = g.to(dtype)
    if P.dtype == dtype:
        return torch.mv(P.T, v)
    c = P.new_zeros(P.shape[1], dtype=dtype)
    step = _row_step(P.shape[1])
    for lo in range(0, P.shape[0], step):
        c.addmv_(P[lo:lo + step].to(dtype).T, v[lo:lo + step])
    return c


def subspace_expand(P, alpha, base=None):
    """w = base + P α: P (D×k), α (k), base (D) or None → w (D) in base's dtype (P's without
    base), accumulated in float32 (float64 when an input is float64)."""
    tensors = (P, alpha) if base is None else (P, alpha, base)
    dtype = acc_dtype(*tensors)
    out_dtype = P.dtype if base is None else base.dtype
    a = alpha.to(dtype)
    if P.dtype == dtype and out_dtype == dtype:
        return torch.mv(P, a) if base is None else torch.addmv(base.to(dtype), P, a)
    w = P.new_empty(P.shape[0], dtype=out_dtype)
    step = _row_step(P.shape[1])
    for lo in range(0, P.shape[0], step):
        Pb = P[lo:lo + step].to(dtype)
        part = torch.mv(Pb, a) if base is None else torch.addmv(base[lo:lo + step].to(dtype), Pb, a)
        w[lo:lo + step] = part
    return w
