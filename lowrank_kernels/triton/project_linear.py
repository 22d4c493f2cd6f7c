"""Triton kernel of the per-sample projections of a linear layer over tokens,
(Uᵀ V)_i = ⟨g_i, V⟩ = Σ_t e_itᵀ (V a_it + v_b): per block of (i, t) rows, Y = A Vᵀ is built
tile by tile on chip and dotted with E row by row, so neither Y nor a per-sample gradient is
stored. One program per (row tile, column of V's stack, split of the output tiles); the token
sums and split partials are added after. The input side is a token_rows.Tokens, so
project_conv2d runs the same kernel."""
import torch
import triton
import triton.language as tl

from .token_rows import (input_precision, linear_tokens, load_input, load_rows, output_tokens,
                         tile)


@triton.jit
def _project_linear_kernel(A, a_s0, a_s1, a_s2, a_s3, E, e_s0, e_s1, e_s2, V, v_s0, v_s1, v_s2,
                           VB, vb_s0, vb_s1, OUT, M, T, d_in, a_step, d_out, tiles_per_group,
                           n_tiles, tiles_per_split, m, H, W, W_out,
                           KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr,
                           SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                           DH: tl.constexpr, DW: tl.constexpr, IM2COL: tl.constexpr,
                           HAS_VBIAS: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
                           PRECISION: tl.constexpr, SPLIT_V: tl.constexpr):
    # Products on the tensor cores in the inputs' dtype: A and V of one 16-bit dtype as they
    # are; SPLIT_V (A 16-bit, V fp32): V as hi + lo in A's dtype, two dots (V not rounded).
    # OUT[s, j, r] = Σ_{output tiles of split s} Σ_o e_r[g, o] (Σ_k V_j[g·d_out + o, k] ã_r[g, k]
    #                + VB_j[g·d_out + o])
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = (tl.program_id(1) % m).to(tl.int64)
    s = tl.program_id(1) // m
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for tile in range(s * tiles_per_split, tl.minimum((s + 1) * tiles_per_split, n_tiles)):
        g = tile // tiles_per_group
        os = ((tile - g * tiles_per_group) * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)
        v_rows = g * d_out + os
        y = tl.zeros((BLOCK_R, BLOCK_O), dtype=tl.float32)
        for k0 in range(0, d_in, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = load_input(A, rows, ks, M, d_in, T, a_s0, a_s1, a_s2, a_s3, g * a_step,
                           H, W, W_out, KH, KW, SH, SW, PH, PW, DH, DW, IM2COL, False)
            v = tl.load(V + j * v_s0 + v_rows[:, None] * v_s1 + ks[None, :] * v_s2,
                        mask=(os[:, None] < d_out) & (ks[None, :] < d_in), other=0.0)
            if SPLIT_V:
                v_hi = v.to(a.dtype)
                v_lo = (v - v_hi.to(tl.float32)).to(a.dtype)
                y = tl.dot(a, tl.trans(v_hi), y, input_precision=PRECISION)
                y = tl.dot(a, tl.trans(v_lo), y, input_precision=PRECISION)
            elif a.dtype == v.dtype:
                y = tl.dot(a, tl.trans(v), y, input_precision=PRECISION)
            else:
                y = tl.dot(a.to(tl.float32), tl.trans(v.to(tl.float32)), y,
                           input_precision=PRECISION)
        if HAS_VBIAS:
            vb = tl.load(VB + j * vb_s0 + v_rows * vb_s1, mask=os < d_out, other=0.0)
            y += vb.to(tl.float32)[None, :]
        e = load_rows(E, rows, os, M, d_out, T, e_s0, e_s1, e_s2, g * d_out)
        acc += tl.sum(y * e.to(tl.float32), axis=1)
    tl.store(OUT + (s * m + j) * M + rows, acc, mask=rows < M)


def project_tokens(t, E, V, V_bias, groups):
    """(B, m) fp32: ⟨g_i, V_j⟩ for a token matrix t (token_rows.Tokens), E (B, T, groups·d_out),
    V (m, groups·d_out, cols) and V_bias (m, groups·d_out) or None."""
    M, d_out, m = t.B * t.T, E.shape[2] // groups, V.shape[0]
    block_r, block_o, block_k = tile(M), tile(d_out, 64), 32
    tiles_per_group = triton.cdiv(d_out, block_o)
    n_tiles = groups * tiles_per_group
    if not (M and n_tiles and m):  # no rows, outputs or directions: zero projections
        return torch.zeros((t.B, m), device=E.device, dtype=torch.float32)
    row_tiles = triton.cdiv(M, block_r)
    splits = max(1, min(n_tiles, triton.cdiv(512, row_tiles * m)))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)
    out = torch.empty((splits, m, M), device=E.device, dtype=torch.float32)
    half = (torch.float16, torch.bfloat16)
    split_v = t.data.dtype in half and V.dtype == torch.float32
    if t.data.dtype in half and V.dtype in half and V.dtype != t.data.dtype:
        V = V.float()
        split_v = True
    # fp32 operands: full fp32 products unless TF32 is allowed (16-bit ones: exact products).
    precision = input_precision(torch.float32 if t.data.dtype != V.dtype and not split_v
                                else t.data.dtype)
    vb = V_bias if V_bias is not None else V
    _project_linear_kernel[(row_tiles, splits * m)](
        *t.args(), E, *E.stride(), V, *V.stride(), vb, vb.stride(0), vb.stride(1), out, M,
        t.T, t.cols, t.col_step, d_out, tiles_per_group, n_tiles, tiles_per_split, m,
        *t.geometry, **t.conv, HAS_VBIAS=V_bias is not None, BLOCK_R=block_r,
        BLOCK_O=block_o, BLOCK_K=block_k, PRECISION=precision, SPLIT_V=split_v,
        num_warps=8 if block_r * block_o >= 128 * 64 else 4)
    # (B, m), contiguous as the fake kernel says.
    return out.sum(0).view(m, t.B, t.T).sum(2).T.contiguous()


def project_linear(A, E, V, V_bias=None):
    """Uᵀ V in fp32 for a linear layer: A (B[, T], d_in), E (B[, T], d_out);
    V (d_out, d_in) -> (B,), V (m, d_out, d_in) -> (B, m); V_bias (d_out,) or (m, d_out)."""
    Vm = V if V.dim() == 3 else V[None]
    vb = None if V_bias is None else (V_bias if V_bias.dim() == 2 else V_bias[None])
    out = project_tokens(linear_tokens(A), output_tokens(E), Vm, vb, 1)
    return out if V.dim() == 3 else out[:, 0]
