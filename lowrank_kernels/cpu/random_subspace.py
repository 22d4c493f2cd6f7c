"""CPU random_subspace_expand / random_subspace_project with the random basis P = s·Ω (D×d) never stored:
Ω generated a block of rows at a time by the native Philox kernel (lowrank_kernels.sketch_omega,
the same Ω bit for bit as the reference's PyTorch Philox) and multiplied at once with one BLAS
GEMV while the block is in cache; the scale folded into α (expand) or applied to the d-vector
(project), base added by the GEMV (addmv). At most _BLOCK_ENTRIES entries of Ω live."""
import torch

# Entries of Ω generated at a time (1 MiB of fp32: stays in L2 for the GEMV).
_BLOCK_ENTRIES = 1 << 18


def _omega_blocks(D, d, seed, rademacher, device, dtype):
    """(lo, hi, Ω[lo:hi, :d] in dtype) for consecutive row blocks."""
    from .. import sketch_omega  # the public op (native on CPU); imported late: no cycle

    dist = "rademacher" if rademacher else "gaussian"
    step = max(1, _BLOCK_ENTRIES // max(d, 1))
    for lo in range(0, D, step):
        hi = min(lo + step, D)
        rows = torch.arange(lo, hi, dtype=torch.int64, device=device)
        yield lo, hi, sketch_omega(rows, d, seed, dist, 0).to(dtype)


def random_subspace_expand(alpha, seed, D, scale, rademacher, base=None):
    """w = base + s·Ω α: α (d), Ω (D×d) from (seed, i, j) → w (D) in base's dtype (float32
    without base); float64 arithmetic for float64 inputs, else float32."""
    dtype = torch.float64 if alpha.dtype == torch.float64 else torch.float32
    a = alpha.to(dtype) * scale
    w = torch.empty(D, dtype=dtype, device=alpha.device)
    if alpha.shape[0] == 0:
        w.zero_()
    else:
        for lo, hi, Om in _omega_blocks(D, alpha.shape[0], seed, rademacher, alpha.device, dtype):
            if base is None:
                torch.mv(Om, a, out=w[lo:hi])
            else:
                torch.addmv(base[lo:hi].to(dtype), Om, a, out=w[lo:hi])
        return w if base is None else w.to(base.dtype)
    return w if base is None else (w + base.to(dtype)).to(base.dtype)


def random_subspace_project(g, seed, d, scale, rademacher):
    """c = s·Ωᵀ g: g (D), Ω (D×d) from (seed, i, j) → c (d), float32 (float64 for float64)."""
    dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    c = torch.zeros(d, dtype=dtype, device=g.device)
    v = g.to(dtype)
    if d:
        for lo, hi, Om in _omega_blocks(g.shape[0], d, seed, rademacher, g.device, dtype):
            c.addmv_(Om.T, v[lo:hi])
    return c.mul_(scale)
