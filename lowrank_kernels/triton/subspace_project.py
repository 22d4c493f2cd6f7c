"""Triton kernels of the stored-basis projections, each one pass over P (D×k), fp32
accumulation, int64 offsets:

    c = Pᵀ g       programs own contiguous row ranges of P and write k-vectors of partial
                   sums (a (programs × k) fp32 buffer, summed after: deterministic);
    w = base + P α programs own BLOCK_D rows and loop over k.
"""
import torch
import triton
import triton.language as tl

from .._capabilities import triton_interpreter


@triton.jit
def _subspace_project_kernel(P, sp0, sp1, g, sg, partial, D, K, rows_per_program,
                             BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    start = pid.to(tl.int64) * rows_per_program
    end = tl.minimum(start + rows_per_program, D)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_D):
        rows = r0 + tl.arange(0, BLOCK_D).to(tl.int64)
        row_ok = rows < end
        p = tl.load(P + rows[:, None] * sp0 + cols[None, :] * sp1,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        v = tl.load(g + rows * sg, mask=row_ok, other=0.0).to(tl.float32)
        acc += tl.sum(p * v[:, None], axis=0)
    tl.store(partial + pid.to(tl.int64) * K + cols, acc, mask=col_ok)


@triton.jit
def _subspace_expand_kernel(P, sp0, sp1, alpha, sa, base, sb, out, D, K,
                            HAS_BASE: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        p = tl.load(P + rows[:, None] * sp0 + cols[None, :] * sp1,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        a = tl.load(alpha + cols * sa, mask=col_ok, other=0.0).to(tl.float32)
        acc += tl.sum(p * a[None, :], axis=1)
    if HAS_BASE:
        acc += tl.load(base + rows * sb, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out + rows, acc, mask=row_ok)


def _block_k(K):
    return min(triton.next_power_of_2(max(K, 1)), 64)


def subspace_project(P: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """c = Pᵀ g in fp32; P: D×k, g: D (fp32/fp16, bf16 on GPU; dtypes may differ)."""
    D, K = P.shape
    if D == 0 or K == 0:  # an empty basis or no rows: c = 0
        return torch.zeros(K, device=P.device, dtype=torch.float32)
    block_k = _block_k(K)
    block_d = max(16, 4096 // block_k)
    # Enough programs to fill a GPU; few under the interpreter, where each one costs.
    programs = min(triton.cdiv(D, block_d), 16 if triton_interpreter() else 1024)
    rows_per_program = triton.cdiv(triton.cdiv(D, max(programs, 1)), block_d) * block_d
    programs = max(triton.cdiv(D, rows_per_program), 1)
    partial = torch.zeros((programs, K), device=P.device, dtype=torch.float32)
    if D > 0 and K > 0:
        _subspace_project_kernel[(programs, triton.cdiv(K, block_k))](
            P, P.stride(0), P.stride(1), g, g.stride(0), partial, D, K, rows_per_program,
            BLOCK_D=block_d, BLOCK_K=block_k)
    return partial.sum(dim=0)


def subspace_expand(P: torch.Tensor, alpha: torch.Tensor, base: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """w = base + P α, accumulated in fp32, written in base's dtype (P's without base)."""
    D, K = P.shape
    out = torch.empty(D, device=P.device, dtype=P.dtype if base is None else base.dtype)
    block_k = _block_k(K)
    block_d = max(16, 4096 // block_k)
    if D > 0:
        _subspace_expand_kernel[(triton.cdiv(D, block_d),)](
            P, P.stride(0), P.stride(1), alpha, alpha.stride(0),
            base if base is not None else out, base.stride(0) if base is not None else 0,
            out, D, K, HAS_BASE=base is not None, BLOCK_D=block_d, BLOCK_K=block_k)
    return out
