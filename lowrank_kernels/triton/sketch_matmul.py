"""Triton kernel of Y = M Ω with Ω generated in registers (never stored): one program per
BLOCK_M × BLOCK_N tile of Y, looping over the inner dimension in BLOCK_K steps; each step
loads a tile of M (any strides, widened to fp32) and generates the matching BLOCK_K × BLOCK_N
tile of Ω from (seed, row_offset + inner index, column) with Philox, then accumulates with
tl.dot in fp32. When Y has few tiles (a thin sketch of a wide M) the inner dimension is split
across programs (split-K) whose partial sums are added in a fixed order (deterministic);
the only extra memory is splits × m × k floats, never anything of Ω's size.
Ωᵀ M is computed as (Mᵀ Ω)ᵀ, Mᵀ being a strided view: the same kernel.
"""
import torch
import triton
import triton.language as tl

from .philox import omega_tile


@triton.jit
def _sketch_matmul_kernel(M, sm0, sm1, m, n, Y, k, seed, row_offset, inner_per_split,
                          RADEMACHER: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          PRECISION: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    groups = tl.program_id(1) * (BLOCK_N // 4) + tl.arange(0, BLOCK_N // 4)
    split = tl.program_id(2)
    # This program's share of the inner dimension (split-K): [start, end).
    start = split.to(tl.int64) * inner_per_split
    end = tl.minimum(start + inner_per_split, n)
    # The tile is accumulated transposed, (Ω-tile)ᵀ (M-tile)ᵀ: with the generated Ω tile as
    # the B operand, the sm_90 compiler (Triton 3.9, TF32 wgmma tiles) rejects the shared
    # layout of its join/reshape ("Illegal shared layout" in TritonGPUOptimizeDotOperands).
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        inner = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        a = tl.load(M + rows[:, None] * sm0 + inner[None, :] * sm1,
                    mask=(rows[:, None] < m) & (inner[None, :] < end), other=0.0)
        # Rows of Ω past `end` meet zero columns of M: no mask needed on the generated tile.
        omega = tl.trans(omega_tile(seed, row_offset + inner, groups, RADEMACHER))
        if a.dtype == tl.float32:
            acc = tl.dot(omega, tl.trans(a), acc, input_precision=PRECISION)
        else:
            # 16-bit M on the tensor cores: Ω as hi + lo in M's dtype, two dots (Ω itself is
            # not rounded to 16 bits; ±1 Rademacher entries are exact in hi alone).
            hi = omega.to(a.dtype)
            acc = tl.dot(hi, tl.trans(a), acc)
            if not RADEMACHER:
                lo = (omega - hi.to(tl.float32)).to(a.dtype)
                acc = tl.dot(lo, tl.trans(a), acc)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    Y += split.to(tl.int64) * m * k  # this split's partial sum
    tl.store(Y + rows[None, :] * k + cols[:, None], acc,
             mask=(rows[None, :] < m) & (cols[:, None] < k))


def _splits(tiles, inner, block_k, device):
    """Split-K factor: enough programs to fill the GPU (about two per SM) when the output has
    few tiles (m·k small against n), each split keeping ≥ 16 BLOCK_K steps of the inner
    dimension. One split under the interpreter."""
    if device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(target, tiles), inner // (16 * block_k)))


def _input_precision():
    # fp32 products unless the user allowed TF32 for matmuls, as torch does.
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def sketch_matmul(M: torch.Tensor, k: int, seed: int, rademacher: bool, transpose: bool,
                  row_offset: int) -> torch.Tensor:
    """M Ω (m × k; Ω rows row_offset .. row_offset+n) or, transpose=True, Ωᵀ M (k × n; Ω rows
    row_offset .. row_offset+m), fp32, M: 2-D fp32/fp16 (bf16 on GPU), any strides."""
    A = M.T if transpose else M
    rows, inner = A.shape
    if rows == 0 or k == 0 or inner == 0:
        Y = torch.zeros((rows, k), device=M.device, dtype=torch.float32)
        return Y.T.contiguous() if transpose else Y
    # 256-row tiles where M is tall: each generated Ω tile serves twice the rows of 128.
    block_m = 256 if rows >= 1024 else (128 if rows >= 128 else
                                        max(16, triton.next_power_of_2(rows)))
    block_n = 64 if k > 32 else (32 if k > 16 else 16)
    block_k = 32
    tiles = triton.cdiv(rows, block_m) * triton.cdiv(k, block_n)
    splits = _splits(tiles, inner, block_k, M.device)
    inner_per_split = triton.cdiv(triton.cdiv(inner, splits), block_k) * block_k
    splits = triton.cdiv(inner, inner_per_split)
    Y = torch.empty((splits, rows, k), device=M.device, dtype=torch.float32)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(k, block_n), splits)
    _sketch_matmul_kernel[grid](A, A.stride(0), A.stride(1), rows, inner, Y, k, seed, row_offset,
                                inner_per_split, RADEMACHER=rademacher, BLOCK_M=block_m,
                                BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=_input_precision(),
                                num_warps=8 if block_m >= 256 else 4)
    # Partial sums added in a fixed order: deterministic.
    Y = Y[0] if splits == 1 else Y.sum(0)
    return Y.T.contiguous() if transpose else Y
