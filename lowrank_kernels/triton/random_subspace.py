"""Triton kernels of the random-basis projections with P = s·Ω (D×d) generated in registers
from (seed, row, column) by the sketch family's Philox tile (triton/philox.py: omega_tile),
never stored; fp32 accumulation, int64 row indices:

    w = base + s·Ω α   programs own BLOCK_D rows and loop over the d columns;
    c = s·Ωᵀ g         programs own a row range × a block of columns and write partial
                       k-vectors (a (programs × d) fp32 buffer, summed after: deterministic).
"""
import torch
import triton
import triton.language as tl

from .._capabilities import triton_interpreter
from .philox import omega_tile


@triton.jit
def _random_expand_kernel(alpha, sa, base, sb, out, D, d, seed, scale,
                          HAS_BASE: tl.constexpr, RADEMACHER: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for c0 in range(0, d, BLOCK_C):
        groups = c0 // 4 + tl.arange(0, BLOCK_C // 4)
        cols = c0 + tl.arange(0, BLOCK_C)
        a = tl.load(alpha + cols * sa, mask=cols < d, other=0.0).to(tl.float32)
        acc += tl.sum(omega_tile(seed, rows, groups, RADEMACHER) * a[None, :], axis=1)
    acc = acc * scale
    if HAS_BASE:
        acc += tl.load(base + rows * sb, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out + rows, acc, mask=row_ok)


@triton.jit
def _random_project_kernel(g, sg, partial, D, d, rows_per_program, seed,
                           RADEMACHER: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    groups = tl.program_id(1) * (BLOCK_C // 4) + tl.arange(0, BLOCK_C // 4)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    start = pid.to(tl.int64) * rows_per_program
    end = tl.minimum(start + rows_per_program, D)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_D):
        rows = r0 + tl.arange(0, BLOCK_D).to(tl.int64)
        v = tl.load(g + rows * sg, mask=rows < end, other=0.0).to(tl.float32)
        acc += tl.sum(omega_tile(seed, rows, groups, RADEMACHER) * v[:, None], axis=0)
    tl.store(partial + pid.to(tl.int64) * d + cols, acc, mask=cols < d)


def _block_c(d):
    return max(4, min(64, triton.next_power_of_2(d)))


def random_subspace_expand(alpha, seed, D, scale, rademacher, base=None):
    """w = base + s·Ω α in fp32, written in base's dtype (float32 without base)."""
    d = alpha.shape[0]
    out = torch.empty(D, device=alpha.device, dtype=torch.float32 if base is None else base.dtype)
    if D == 0:
        return out
    if d == 0:
        return out.copy_(base) if base is not None else out.zero_()
    block_c = _block_c(d)
    block_d = max(16, 4096 // block_c)
    _random_expand_kernel[(triton.cdiv(D, block_d),)](
        alpha, alpha.stride(0), base if base is not None else out,
        base.stride(0) if base is not None else 0, out, D, d, seed, scale,
        HAS_BASE=base is not None, RADEMACHER=rademacher, BLOCK_D=block_d, BLOCK_C=block_c)
    return out


def random_subspace_project(g, seed, d, scale, rademacher):
    """c = s·Ωᵀ g in fp32."""
    D = g.shape[0]
    if D == 0 or d == 0:  # no rows or no columns: c = 0
        return torch.zeros(d, device=g.device, dtype=torch.float32)
    block_c = _block_c(d)
    block_d = max(16, 4096 // block_c)
    col_blocks = triton.cdiv(d, block_c)
    # Enough programs to fill a GPU (row splits × column blocks); few under the interpreter.
    target = 16 if triton_interpreter() else 4096
    programs = max(1, min(triton.cdiv(D, block_d), triton.cdiv(target, max(col_blocks, 1))))
    rows_per_program = triton.cdiv(triton.cdiv(D, programs), block_d) * block_d
    programs = max(triton.cdiv(D, rows_per_program), 1)
    partial = torch.zeros((programs, d), device=g.device, dtype=torch.float32)
    if D > 0 and d > 0:
        _random_project_kernel[(programs, col_blocks)](
            g, g.stride(0), partial, D, d, rows_per_program, seed,
            RADEMACHER=rademacher, BLOCK_D=block_d, BLOCK_C=block_c)
    return partial.sum(dim=0) * scale
