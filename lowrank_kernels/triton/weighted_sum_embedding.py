"""Triton kernel of the embedding weighted sum: row r of U C is Σ_{i,t: idx_it = r} C_i e_it.
Tokens are sorted by index (torch.sort, stable); the segment of table row r is
[starts[r], starts[r+1]) with starts = searchsorted(sorted rows, 0..num_embeddings) — sizes
known on the host, so nothing is read back (no sync). One program per (table row, block of
d, block of m columns of C) sums its segment in a fixed order with tl.dot and writes its
tile (zeros for an unused row or padding_idx: no separate zero fill) — no atomics,
deterministic.

16-bit E keeps the tensor cores and fp32 accumulation: e converts to fp32 exactly and is a
TF32 value (11 or 8 significant bits); the fp32 coefficients are split into two TF32 values,
C = hi + lo + δ with |δ| ≤ 2u|C| (token_rows.split_tf32, u = 2⁻²⁴; C is first scaled by a
power of two per column to |C| ≤ 1, exactly, so the rounding cannot carry into Inf; fp32 E
needs no scale). Two TF32 dots
multiply exactly, into separate fp32 accumulators added at the end: over a row's n tokens the
error is ≤ (n + 2)u·Σ|C e| to first order, as for an fp32-accumulated sum."""
import torch
import triton
import triton.language as tl

from .token_rows import column_scale, split_tf32


@triton.jit
def _weighted_sum_embedding_kernel(ORDER, STARTS, PADDING, T, E, se0, se1, se2, d,
                                   C, sc0, sc1, SCALE, m, OUT, so0, so1,
                                   BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                                   BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    start = tl.load(STARTS + row)
    end = tl.load(STARTS + row + 1)
    end = tl.where(row == PADDING, start, end)  # padding_idx gets no gradient
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc_lo = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)  # 16-bit E: the lo products
    for p0 in range(start, end, BLOCK_T):
        p = p0 + tl.arange(0, BLOCK_T).to(tl.int64)
        p_in = p < end
        token = tl.load(ORDER + p, mask=p_in, other=0).to(tl.int64)
        b32 = token.to(tl.int32) // T  # 32-bit: tokens < B·T < 2³¹
        b = b32.to(tl.int64)
        t = (token.to(tl.int32) - b32 * T).to(tl.int64)
        e = tl.load(E + b[:, None] * se0 + t[:, None] * se1 + k[None, :] * se2,
                    mask=p_in[:, None] & (k[None, :] < d), other=0.0)
        w = tl.load(C + b[:, None] * sc0 + cols[None, :] * sc1,
                    mask=p_in[:, None] & (cols[None, :] < m), other=0.0)
        if e.dtype == tl.float32:
            acc = tl.dot(tl.trans(w), e, acc, input_precision=PRECISION)
        else:  # 16-bit: exact TF32 dots of C's two TF32 pieces (see the module docstring)
            w_hi, w_lo = split_tf32(w)
            e32 = e.to(tl.float32)
            acc = tl.dot(tl.trans(w_hi), e32, acc, input_precision="tf32")
            acc_lo = tl.dot(tl.trans(w_lo), e32, acc_lo, input_precision="tf32")
    if E.dtype.element_ty != tl.float32:
        acc += acc_lo
    scale = tl.load(SCALE + cols, mask=cols < m, other=1.0)
    tl.store(OUT + cols[:, None] * so0 + row * so1 + k[None, :],
             acc * scale[:, None], mask=(cols[:, None] < m) & (k[None, :] < d))


def weighted_sum_embedding(idx, E, c, num_embeddings, padding_idx=None):
    """U c: (num_embeddings, d) for c (B,), (m, num_embeddings, d) for c (B, m), in fp32.
    idx (B, T) int64, E (B, T, d) fp32/fp16 (bf16 on GPU)."""
    B, T = idx.shape
    d = E.shape[-1]
    C = (c if c.dim() == 2 else c[:, None]).to(torch.float32)
    m = C.shape[1]
    scale = torch.ones(m, device=C.device) if E.dtype == torch.float32 else column_scale(C)
    C = C / scale
    out = torch.empty((m, num_embeddings, d), device=E.device, dtype=torch.float32)
    if d and m:
        sorted_rows, order = torch.sort(idx.reshape(-1), stable=True)
        table_rows = torch.arange(num_embeddings + 1, device=idx.device, dtype=torch.int64)
        starts = torch.searchsorted(sorted_rows, table_rows)  # (num_embeddings + 1,)
        block_d = 64 if d > 32 else (32 if d > 16 else 16)
        block_m = 32 if m > 16 else 16
        grid = (num_embeddings, triton.cdiv(d, block_d), triton.cdiv(m, block_m))
        # Token indices run over a contiguous (B, T) layout: flat token = b T + t.
        _weighted_sum_embedding_kernel[grid](
            order, starts, -1 if padding_idx is None else padding_idx, T, E, E.stride(0),
            E.stride(1), E.stride(2), d, C, C.stride(0), C.stride(1), scale, m, out, out.stride(0),
            out.stride(1), BLOCK_T=16, BLOCK_D=block_d, BLOCK_M=block_m,
            PRECISION="ieee" if not torch.backends.cuda.matmul.allow_tf32 else "tf32")
    return out if c.dim() == 2 else out[0]
