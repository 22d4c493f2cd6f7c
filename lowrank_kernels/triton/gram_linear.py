"""Triton kernel of K = (A Aᵀ + b) ⊙ (E Eᵀ): one program per BLOCK×BLOCK tile of K on or
above the diagonal, both inner products accumulated in fp32 with tl.dot, the tile mirrored."""
import torch
import triton
import triton.language as tl


@triton.jit
def _accumulate_inner_products(X, s0, s1, d, rows_i, rows_j, B, acc,
                               BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                               PRECISION: tl.constexpr):
    # acc += X[rows_i, :] X[rows_j, :]ᵀ
    cols = tl.arange(0, BLOCK_K)
    for k0 in range(0, d, BLOCK_K):
        k = k0 + cols
        xi = tl.load(X + rows_i[:, None] * s0 + k[None, :] * s1,
                     mask=(rows_i[:, None] < B) & (k[None, :] < d), other=0.0)
        xj = tl.load(X + rows_j[:, None] * s0 + k[None, :] * s1,
                     mask=(rows_j[:, None] < B) & (k[None, :] < d), other=0.0)
        acc = tl.dot(xi, tl.trans(xj), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _gram_linear_kernel(A, sa0, sa1, d_in, E, se0, se1, d_out, K, B,
                        HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                        PRECISION: tl.constexpr):
    ti = tl.program_id(0)
    tj = tl.program_id(1)
    if ti > tj:  # below the diagonal: written by its mirror image
        return
    rows_i = (ti * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    rows_j = (tj * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    zero = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    gram_a = _accumulate_inner_products(A, sa0, sa1, d_in, rows_i, rows_j, B, zero,
                                        BLOCK, BLOCK_K, PRECISION)
    gram_e = _accumulate_inner_products(E, se0, se1, d_out, rows_i, rows_j, B, zero,
                                        BLOCK, BLOCK_K, PRECISION)
    if HAS_BIAS:
        gram_a += 1.0
    k_tile = gram_a * gram_e
    gi = rows_i[:, None]
    gj = rows_j[None, :]
    inside = (gi < B) & (gj < B)
    tl.store(K + gi * B + gj, k_tile, mask=inside & (gi <= gj))
    tl.store(K + gj * B + gi, k_tile, mask=inside & (gi < gj))


def _input_precision(dtype):
    # fp32 inputs: full fp32 products unless the user allowed TF32 for matmuls, as torch does.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def gram_linear(A: torch.Tensor, E: torch.Tensor, bias: bool = False) -> torch.Tensor:
    """K = (A Aᵀ + b) ⊙ (E Eᵀ) in fp32; A: B×d_in, E: B×d_out (fp32, fp16, bf16 on GPU)."""
    B = A.shape[0]
    K = torch.empty((B, B), device=A.device, dtype=torch.float32)
    if B == 0:
        return K
    block = 64 if B > 32 else 32
    tiles = triton.cdiv(B, block)
    _gram_linear_kernel[(tiles, tiles)](
        A, A.stride(0), A.stride(1), A.shape[1], E, E.stride(0), E.stride(1), E.shape[1], K, B,
        HAS_BIAS=bias, BLOCK=block, BLOCK_K=32, PRECISION=_input_precision(A.dtype))
    return K
