"""Triton kernel that writes Ω[rows, col_offset + 0:k] (float32) from the in-register generator
(lowrank_kernels/triton/philox.py) with its float64 Box–Muller, as the reference computes Ω
(1 ulp); the fused kernels' float32 transform is within a few ulps of it."""
import torch
import triton
import triton.language as tl

from .philox import omega_tile


@triton.jit
def _sketch_omega_kernel(rows_ptr, n, out, k, seed, first_group, RADEMACHER: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    groups = first_group + tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    rows = tl.load(rows_ptr + r, mask=r < n, other=0).to(tl.int64)
    tile = omega_tile(seed, rows, groups, RADEMACHER)
    cols = tl.program_id(1) * (4 * BLOCK_G) + tl.arange(0, 4 * BLOCK_G)
    r64 = r.to(tl.int64)[:, None]
    tl.store(out + r64 * k + cols[None, :], tile, mask=(r64 < n) & (cols[None, :] < k))


def sketch_omega(rows: torch.Tensor, k: int, seed: int, rademacher: bool,
                 col_offset: int) -> torch.Tensor:
    """Ω[rows, col_offset : col_offset + k] as float32 (len(rows) × k); rows: 1-D int64;
    col_offset a multiple of 4."""
    n = rows.shape[0]
    out = torch.empty((n, k), device=rows.device, dtype=torch.float32)
    if n == 0 or k == 0:
        return out
    block_r, block_g = 32, 8
    grid = (triton.cdiv(n, block_r), triton.cdiv(k, 4 * block_g))
    _sketch_omega_kernel[grid](rows.contiguous(), n, out, k, seed, col_offset // 4,
                               RADEMACHER=rademacher,
                               BLOCK_R=block_r, BLOCK_G=block_g)
    return out
