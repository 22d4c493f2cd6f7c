"""Triton kernel of the weighted sum of per-sample gradients of a linear layer over tokens,
W = U c = Σ_i c_i Σ_t e_it ã_itᵀ = (c ⊙ E)ᵀ Ã over all (i, t) rows: one GEMM with the row
scaling fused into the load of E (ã = [a, 1]: the last column is the bias part). One program
per (output tile, input tile, column of C, split of the rows); split partials summed after.
The input side is a token_rows.Tokens, so weighted_sum_conv2d runs the same kernel.

fp32 accumulation for 16-bit inputs too, on the tensor cores: c ⊙ e is formed in fp32
(x = fl(c e), one rounding) and cannot be a 16-bit operand (24 bits, and fp16's exponent
range loses c e < 2⁻¹⁴ altogether). Ã converts to fp32 exactly, and its values have 11 (fp16)
or 8 (bf16) significant bits, so they are TF32 values; x is split into two TF32 values,
x = hi + lo + δ with |δ| ≤ 2u|x| (token_rows.split_tf32, u = 2⁻²⁴). Two TF32 dots, hiᵀÃ and
loᵀÃ, then multiply exactly and sum in fp32, each into its own accumulator (so the small lo
products are not rounded against the running sum of the large ones), added once at the end;
the warps are chosen as for a tile of twice the area (the two accumulators' registers).
Over N rows: |W − exact| ≤ (N + 3)u·Σ|c e ã| to first order — 3u per term (the product and
the split), γ_{N−1} for the hi sum, 2⁻¹¹ of that for the lo sum, one final addition — the
bound of an fp32-accumulated sum of fl(c e) ã. C's power-of-two column scale is exact."""
import torch
import triton
import triton.language as tl

from .token_rows import (input_precision, linear_tokens, load_input, load_rows, num_warps,
                         output_tokens, column_scale, split_tf32, tile)


@triton.jit
def _weighted_sum_linear_kernel(A, a_s0, a_s1, a_s2, a_s3, E, e_s0, e_s1, e_s2, C, c_s0, c_s1,
                                SCALE, OUT, OUT_B, M, T, d_in, a_step, d_out, tiles_per_group,
                                n_out, m, rows_per_split, H, W, W_out,
                                KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr,
                                SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                                DH: tl.constexpr, DW: tl.constexpr, IM2COL: tl.constexpr,
                                HAS_BIAS: tl.constexpr, BLOCK_O: tl.constexpr,
                                BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                                PRECISION: tl.constexpr):
    # OUT[s, j, g·d_out + o, k] = Σ_{rows r of split s} C[i(r), j] E[r, g, o] Ã[r, g, k] for
    # k < d_in; OUT_B[s, j, g·d_out + o] the same for the ones column k = d_in (the bias part).
    tile = tl.program_id(0)
    kt = tl.program_id(1)
    j = tl.program_id(2) % m
    s = tl.program_id(2) // m
    g = tile // tiles_per_group
    os = ((tile - g * tiles_per_group) * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)
    ks = (kt * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    r_lo = s.to(tl.int64) * rows_per_split
    r_hi = tl.minimum(r_lo + rows_per_split, M)
    acc = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32)
    acc_lo = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32)  # 16-bit inputs: the lo products
    for r0 in range(r_lo, r_hi, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        e = load_rows(E, rows, os, r_hi, d_out, T, e_s0, e_s1, e_s2, g * d_out)
        sample = (rows.to(tl.int32) // T).to(tl.int64)
        c = tl.load(C + sample * c_s0 + j * c_s1, mask=rows < r_hi, other=0.0)
        a = load_input(A, rows, ks, r_hi, d_in, T, a_s0, a_s1, a_s2, a_s3, g * a_step,
                       H, W, W_out, KH, KW, SH, SW, PH, PW, DH, DW, IM2COL, HAS_BIAS)
        ce = e.to(tl.float32) * c[:, None]
        if a.dtype == tl.float32:
            acc = tl.dot(tl.trans(ce), a, acc, input_precision=PRECISION)
        else:  # 16-bit: exact TF32 dots of c·e's two TF32 pieces (see the module docstring)
            hi, lo = split_tf32(ce)
            a32 = a.to(tl.float32)
            acc = tl.dot(tl.trans(hi), a32, acc, input_precision="tf32")
            acc_lo = tl.dot(tl.trans(lo), a32, acc_lo, input_precision="tf32")
    if A.dtype.element_ty != tl.float32:
        acc += acc_lo
    acc = acc * tl.load(SCALE + j)  # C's column scale (C was divided by it), in the epilogue
    out_rows = (s * m + j).to(tl.int64) * n_out + g * d_out + os
    mask = (os[:, None] < d_out) & (ks[None, :] < d_in)
    tl.store(OUT + out_rows[:, None] * d_in + ks[None, :], acc, mask=mask)
    if HAS_BIAS:
        if kt * BLOCK_K <= d_in and d_in < (kt + 1) * BLOCK_K:  # this tile holds column d_in
            bias_part = tl.sum(tl.where(ks[None, :] == d_in, acc, 0.0), axis=1)
            tl.store(OUT_B + out_rows, bias_part, mask=os < d_out)


def weighted_sum_tokens(t, E, c, groups, bias):
    """(W (m, groups·d_out, cols), bias part (m, groups·d_out) or None) in fp32 for a token
    matrix t (token_rows.Tokens), E (B, T, groups·d_out) and C = c (B, m)."""
    M, n_out = t.B * t.T, E.shape[2]
    d_out = n_out // groups
    n_cols = t.cols + int(bias)
    m = c.shape[1]
    if not (M and n_out and n_cols and m):  # no rows or no parameters: a zero sum
        W = torch.zeros((m, n_out, t.cols), device=E.device, dtype=torch.float32)
        return W, (W.new_zeros((m, n_out)) if bias else None)
    scale = column_scale(c)
    c = (c.float() / scale).contiguous()
    block_o, block_k, block_r = tile(d_out), tile(n_cols), 32
    tiles_per_group = triton.cdiv(d_out, block_o)
    programs = groups * tiles_per_group * triton.cdiv(n_cols, block_k) * m
    splits = max(1, min(triton.cdiv(512, programs), triton.cdiv(M, 4 * block_r)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), block_r) * block_r
    splits = triton.cdiv(M, rows_per_split)
    out = torch.empty((splits, m, n_out, t.cols), device=E.device, dtype=torch.float32)
    out_b = out.new_empty((splits, m, n_out)) if bias else out
    grid = (groups * tiles_per_group, triton.cdiv(n_cols, block_k), splits * m)
    _weighted_sum_linear_kernel[grid](
        *t.args(), E, *E.stride(), c, *c.stride(), scale, out, out_b, M, t.T, t.cols, t.col_step,
        d_out, tiles_per_group, n_out, m, rows_per_split, *t.geometry, **t.conv,
        HAS_BIAS=bias, BLOCK_O=block_o, BLOCK_K=block_k, BLOCK_R=block_r,
        PRECISION=input_precision(E.dtype),
        num_warps=num_warps(block_o, block_k, 1 if E.dtype == torch.float32 else 2))
    def total(partials):  # the splits' sum, unscaled
        return partials.sum(0) if splits > 1 else partials[0]

    return total(out), (total(out_b) if bias else None)


def weighted_sum_linear(A, E, c, bias=False):
    """U c for a linear layer: (W, bias part or None) in fp32; A (B[, T], d_in),
    E (B[, T], d_out); c (B,) -> (d_out, d_in), (d_out,); c (B, m) -> (m, …)."""
    W, b = weighted_sum_tokens(linear_tokens(A), output_tokens(E),
                               c if c.dim() == 2 else c[:, None], 1, bias)
    if c.dim() == 1:
        return W[0], (b[0] if bias else None)
    return W, b
