"""Triton kernels of the per-sample-gradient (cross-)Gram of a linear layer over tokens,
K_ij = Σ_g Σ_{t,s} (ã_it·ã2_js)(e_it·e2_js) (group slices g; ã = [a, 1] with bias), by two routes:

- token pair: one program per block of SB × SB samples computes the token Gram tiles
  X = (A A2ᵀ + b) ⊙ (E E2ᵀ) on chip and reduces them to samples (an indicator-matrix product;
  X itself when T = 1); on the diagonal blocks of a symmetric K only token tiles on and above
  the diagonal are computed. 2·B²·T²·(d_in + d_out) flops.
- per sample: the per-sample gradients g_i = E_iᵀ Ã_i are built tile by tile into a bounded
  fp32 workspace (a chunk of the parameters for every sample), and K += W1 W2ᵀ is accumulated
  in split-L partial sums. 2·B·T·d_in·d_out + 2·B²·d_in·d_out flops, memory ≤ the workspace.

The input side is a token_rows.Tokens (a strided linear input or a Conv2d input read by implicit
im2col), so gram_conv2d runs the same kernels."""
import torch
import triton
import triton.language as tl

from .._capabilities import triton_interpreter
from .token_rows import (input_precision, linear_tokens, load_input, load_rows, num_warps,
                         output_tokens, tile)

WORKSPACE_BYTES = 64 << 20  # per-sample route: per-sample gradient chunk (both sides together)
_BLOCK = 64  # token rows (or samples, T = 1) per tile of the token-pair route


@triton.jit
def _token_gram_tile(A, a_s0, a_s1, a_s2, a_s3, A2, b_s0, b_s1, b_s2, b_s3,
                     E, e_s0, e_s1, e_s2, E2, f_s0, f_s1, f_s2,
                     rows, cols, r_end, c_end, T, d_in, a_step, d_out, G, H, W, W_out,
                     KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                     PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                     IM2COL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                     BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    # X[r, c] = Σ_g (a_r·a2_c + b)(e_r·e2_c) over the group slices; 0 outside the rows/cols.
    x = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    for g in range(G):
        xa = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, d_in, BLOCK_K):
            ta = load_input(A, rows, k0 + ks, r_end, d_in, T, a_s0, a_s1, a_s2, a_s3,
                            g * a_step, H, W, W_out, KH, KW, SH, SW, PH, PW, DH, DW, IM2COL,
                            False)
            tb = load_input(A2, cols, k0 + ks, c_end, d_in, T, b_s0, b_s1, b_s2, b_s3,
                            g * a_step, H, W, W_out, KH, KW, SH, SW, PH, PW, DH, DW, IM2COL,
                            False)
            xa = tl.dot(ta, tl.trans(tb), xa, input_precision=PRECISION)
        xe = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, d_out, BLOCK_K):
            te = load_rows(E, rows, k0 + ks, r_end, d_out, T, e_s0, e_s1, e_s2, g * d_out)
            tf = load_rows(E2, cols, k0 + ks, c_end, d_out, T, f_s0, f_s1, f_s2, g * d_out)
            xe = tl.dot(te, tl.trans(tf), xe, input_precision=PRECISION)
        if HAS_BIAS:
            xa += 1.0
        x += xa * xe
    return x


@triton.jit
def _gram_token_pair_kernel(A, a_s0, a_s1, a_s2, a_s3, A2, b_s0, b_s1, b_s2, b_s3,
                            E, e_s0, e_s1, e_s2, E2, f_s0, f_s1, f_s2,
                            K, ldk, B1, B2, T, d_in, a_step, d_out, G, H, W, W_out,
                            KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr,
                            SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                            DH: tl.constexpr, DW: tl.constexpr, IM2COL: tl.constexpr,
                            HAS_BIAS: tl.constexpr, SYMMETRIC: tl.constexpr,
                            DIAGONAL: tl.constexpr, HALF: tl.constexpr, REDUCE: tl.constexpr,
                            SB: tl.constexpr,
                            SB_PAD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                            PRECISION: tl.constexpr):
    # REDUCE: 0 — one sample per side (SB = 1), the tile sums to a scalar; 1 — T = 1, rows are
    # samples (SB = BLOCK); 2 — SB samples per side, reduced by indicator-matrix products.
    # HALF: both sides are one batch (symmetric K, or its diagonal), so on K's diagonal blocks
    # X is symmetric and only its token tiles c0 ≥ r0 are computed, mirrored.
    bi = tl.program_id(0)
    bj = tl.program_id(1)
    if DIAGONAL:
        bj = bi
    if SYMMETRIC:
        if bi > bj:  # below the diagonal: written by its mirror image
            return
    i0 = bi.to(tl.int64) * SB
    j0 = bj.to(tl.int64) * SB
    r_lo = i0 * T
    r_hi = tl.minimum(i0 + SB, B1) * T
    c_lo = j0 * T
    c_hi = tl.minimum(j0 + SB, B2) * T
    lane = tl.arange(0, BLOCK)
    slot = tl.arange(0, SB_PAD)
    if REDUCE == 0:
        acc = tl.zeros((1, 1), dtype=tl.float32)
    else:
        acc = tl.zeros((SB_PAD, SB_PAD), dtype=tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK):
        c_first = c_lo
        if HALF:
            c_first = tl.where(bi == bj, r0, c_lo)
        for c0 in range(c_first, c_hi, BLOCK):
            rows = r0 + lane
            cols = c0 + lane
            x = _token_gram_tile(A, a_s0, a_s1, a_s2, a_s3, A2, b_s0, b_s1, b_s2, b_s3,
                                 E, e_s0, e_s1, e_s2, E2, f_s0, f_s1, f_s2,
                                 rows, cols, r_hi, c_hi, T, d_in, a_step, d_out, G, H, W, W_out,
                                 KH, KW, SH, SW, PH, PW, DH, DW, IM2COL, HAS_BIAS, BLOCK,
                                 BLOCK_K, PRECISION)
            if HALF:
                mirrored = (bi == bj) & (c0 > r0)
            else:
                mirrored = c0 < c_lo  # never: every token tile is computed
            if REDUCE == 0:
                s = tl.sum(tl.sum(x, axis=1), axis=0)
                acc += tl.where(mirrored, 2.0 * s, s)
            elif REDUCE == 1:
                acc += x
            else:
                # p[u, v] = Σ_{rows of sample i0+u, cols of sample j0+v} X: S_r X S_cᵀ.
                # 32-bit divisions (rows < token_rows.MAX_ROWS): no 64-bit division call.
                si = (rows.to(tl.int32) // T).to(tl.int64) - i0
                sj = (cols.to(tl.int32) // T).to(tl.int64) - j0
                s_r = (si[None, :] == slot[:, None]) & (rows < r_hi)[None, :]
                s_c = (sj[None, :] == slot[:, None]) & (cols < c_hi)[None, :]
                xc = tl.dot(x, tl.trans(s_c.to(tl.float32)), input_precision="ieee")
                p = tl.dot(s_r.to(tl.float32), xc, input_precision="ieee")
                acc += p
                acc += tl.where(mirrored, tl.trans(p), 0.0)
    if REDUCE == 0:
        value = tl.sum(tl.sum(acc, axis=1), axis=0)
        if DIAGONAL:
            tl.store(K + i0, value)
        else:
            tl.store(K + i0 * ldk + j0, value)
            if SYMMETRIC:
                if i0 < j0:
                    tl.store(K + j0 * ldk + i0, value)
    else:
        gi = (i0 + slot)[:, None]
        gj = (j0 + slot)[None, :]
        inside = (slot[:, None] < SB) & (slot[None, :] < SB) & (gi < B1) & (gj < B2)
        if SYMMETRIC:
            tl.store(K + gi * ldk + gj, acc, mask=inside & (gi <= gj))
            tl.store(K + gj * ldk + gi, acc, mask=inside & (gi < gj))
        else:
            tl.store(K + gi * ldk + gj, acc, mask=inside)


@triton.jit
def _per_sample_gradient_kernel(A, a_s0, a_s1, a_s2, a_s3, E, e_s0, e_s1, e_s2, Wk, L,
                                T, d_in, a_step, d_out, tiles_per_group, tile0, k0, ck,
                                H, W, W_out,
                                KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr,
                                SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                                DH: tl.constexpr, DW: tl.constexpr, IM2COL: tl.constexpr,
                                HAS_BIAS: tl.constexpr, BLOCK_O: tl.constexpr,
                                BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
                                PRECISION: tl.constexpr):
    # Wk[b, (u·BLOCK_O + o)·ck + k] (row b of length L)
    #   = Σ_t e_bt[g, o0 + o] ã_bt[g, k0 + kt·BLOCK_K + k]: a per-sample gradient tile, for
    # output tile u of the chunk (group g, rows o0..) and k-tile kt.
    b = tl.program_id(0).to(tl.int64)
    u = tl.program_id(1)
    kt = tl.program_id(2)
    tile = tile0 + u
    g = tile // tiles_per_group
    os = (tile - g * tiles_per_group) * BLOCK_O + tl.arange(0, BLOCK_O)
    ks = k0 + kt * BLOCK_K + tl.arange(0, BLOCK_K)
    ts = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        rows = b * T + t0 + ts
        e = load_rows(E, rows, os, (b + 1) * T, d_out, T, e_s0, e_s1, e_s2, g * d_out)
        a = load_input(A, rows, ks, (b + 1) * T, d_in, T, a_s0, a_s1, a_s2, a_s3, g * a_step,
                       H, W, W_out, KH, KW, SH, SW, PH, PW, DH, DW, IM2COL, HAS_BIAS)
        acc = tl.dot(tl.trans(e), a, acc, input_precision=PRECISION)
    o_local = u * BLOCK_O + tl.arange(0, BLOCK_O)
    k_local = kt * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(Wk + b * L + o_local[:, None] * ck + k_local[None, :], acc)


@triton.jit
def _gram_workspace_kernel(W1, W2, L, P, B1, B2, split_len, SYMMETRIC: tl.constexpr,
                           DIAGONAL: tl.constexpr, BLOCK: tl.constexpr, BLOCK_L: tl.constexpr,
                           PRECISION: tl.constexpr, SPLIT_BF16: tl.constexpr = False):
    # P[s] += W1[:, ls] W2[:, ls]ᵀ (DIAGONAL: P[s] += rowsum(W1[:, ls] ⊙ W2[:, ls])) over split
    # s of L.
    ti = tl.program_id(0)
    tj = tl.program_id(1)
    s = tl.program_id(2)
    if SYMMETRIC:
        if ti > tj:
            return
    rows_i = ti.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    rows_j = tj.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    l_lo = s.to(tl.int64) * split_len
    l_hi = tl.minimum(l_lo + split_len, L)
    ls = tl.arange(0, BLOCK_L)
    if DIAGONAL:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for l0 in range(l_lo, l_hi, BLOCK_L):
            inside = (rows_i[:, None] < B1) & ((l0 + ls)[None, :] < l_hi)
            w1 = tl.load(W1 + rows_i[:, None] * L + (l0 + ls)[None, :], mask=inside, other=0.0)
            w2 = tl.load(W2 + rows_i[:, None] * L + (l0 + ls)[None, :], mask=inside, other=0.0)
            acc += tl.sum(w1 * w2, axis=1)
        out = P + s * B1 + rows_i
        tl.store(out, tl.load(out, mask=rows_i < B1, other=0.0) + acc, mask=rows_i < B1)
    else:
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for l0 in range(l_lo, l_hi, BLOCK_L):
            wi = tl.load(W1 + rows_i[:, None] * L + (l0 + ls)[None, :],
                         mask=(rows_i[:, None] < B1) & ((l0 + ls)[None, :] < l_hi), other=0.0)
            wj = tl.load(W2 + rows_j[:, None] * L + (l0 + ls)[None, :],
                         mask=(rows_j[:, None] < B2) & ((l0 + ls)[None, :] < l_hi), other=0.0)
            if SPLIT_BF16:
                # 16-bit layer inputs: the fp32 workspace as hi + lo bf16 on the tensor cores,
                # hi·hi + hi·lo + lo·hi (16 significant bits a product; lo·lo dropped).
                wi_hi = wi.to(tl.bfloat16)
                wj_hi = wj.to(tl.bfloat16)
                wi_lo = (wi - wi_hi.to(tl.float32)).to(tl.bfloat16)
                wj_lo = (wj - wj_hi.to(tl.float32)).to(tl.bfloat16)
                acc = tl.dot(wi_hi, tl.trans(wj_hi), acc)
                acc = tl.dot(wi_hi, tl.trans(wj_lo), acc)
                acc = tl.dot(wi_lo, tl.trans(wj_hi), acc)
            else:
                acc = tl.dot(wi, tl.trans(wj), acc, input_precision=PRECISION)
        inside = (rows_i[:, None] < B1) & (rows_j[None, :] < B2)
        out = P + (s * B1 + rows_i[:, None]) * B2 + rows_j[None, :]
        tl.store(out, tl.load(out, mask=inside, other=0.0) + acc, mask=inside)


def _token_pair(t1, E1, t2, E2, groups, bias, diagonal, K, precision):
    cross = t2 is not t1
    T = t1.T
    if diagonal:
        sb, reduce_mode, block = 1, 0, _BLOCK
    elif T == 1:
        sb, reduce_mode, block = _BLOCK, 1, _BLOCK
    else:
        sb = max(1, _BLOCK // T)
        reduce_mode, block = (0 if sb == 1 else 2), _BLOCK
    sb_pad = block if reduce_mode == 1 else max(16, triton.next_power_of_2(sb))
    n1, n2 = triton.cdiv(t1.B, sb), triton.cdiv(t2.B, sb)
    _gram_token_pair_kernel[(n1, 1 if diagonal else n2)](
        *t1.args(), *t2.args(), E1, *E1.stride(), E2, *E2.stride(),
        K, K.shape[-1], t1.B, t2.B, T, t1.cols, t1.col_step, E1.shape[2] // groups, groups,
        *t1.geometry, **t1.conv, HAS_BIAS=bias, SYMMETRIC=not cross and not diagonal,
        DIAGONAL=diagonal, HALF=not cross, REDUCE=reduce_mode, SB=sb, SB_PAD=sb_pad,
        BLOCK=block, BLOCK_K=32, PRECISION=precision)
    return K


def _per_sample(t1, E1, t2, E2, groups, bias, diagonal, K, precision):
    cross = t2 is not t1
    B1, B2 = t1.B, t2.B
    rows = B1 + B2 if cross else B1
    d_out, cols = E1.shape[2] // groups, t1.cols + int(bias)
    block_o, block_k, block_t = tile(d_out, 64), tile(cols, 64), 32
    tiles_per_group = triton.cdiv(d_out, block_o)
    n_tiles = groups * tiles_per_group
    budget = max(WORKSPACE_BYTES // 4 // rows, block_o * block_k)  # floats per sample
    ck = min(triton.cdiv(cols, block_k), max(1, budget // (block_o * block_k))) * block_k
    chunk_tiles = max(1, min(n_tiles, budget // (block_o * ck)))
    L = chunk_tiles * block_o * ck
    W1 = torch.empty((B1, L), device=E1.device, dtype=torch.float32)
    W2 = torch.empty((B2, L), device=E1.device, dtype=torch.float32) if cross else W1
    block = 32 if max(B1, B2) <= 32 else 64
    n1 = triton.cdiv(B1, block)
    n2 = 1 if diagonal else triton.cdiv(B2, block)
    # Split L so that about 256 programs run, each over at least 16 k-steps.
    splits = max(1, min(triton.cdiv(L, 16 * block_k), 256 // (n1 * n2)))
    split_len = triton.cdiv(triton.cdiv(L, splits), block_k) * block_k
    partial = torch.zeros((splits,) + tuple(K.shape), device=K.device, dtype=torch.float32)
    gram_precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    # bf16 tensor cores for 16-bit inputs, compiled (the interpreter has no bf16 arithmetic).
    split_bf16 = (E1.dtype in (torch.float16, torch.bfloat16) and not triton_interpreter()
                  and gram_precision == "ieee")
    for k0 in range(0, cols, ck):
        for tile0 in range(0, n_tiles, chunk_tiles):
            n_chunk = min(chunk_tiles, n_tiles - tile0)
            for t, E, Wk in ((t1, E1, W1), (t2, E2, W2)) if cross else ((t1, E1, W1),):
                if n_chunk < chunk_tiles:
                    Wk.zero_()  # the tail chunk leaves part of the workspace unwritten
                _per_sample_gradient_kernel[(t.B, n_chunk, ck // block_k)](
                    *t.args(), E, *E.stride(), Wk, L, t.T, t.cols, t.col_step, d_out,
                    tiles_per_group, tile0, k0, ck, *t.geometry, **t.conv, HAS_BIAS=bias,
                    BLOCK_O=block_o, BLOCK_K=block_k, BLOCK_T=block_t, PRECISION=precision,
                    num_warps=num_warps(block_o, block_k))
            _gram_workspace_kernel[(n1, n2, splits)](
                W1, W2, L, partial, B1, B2, split_len, SYMMETRIC=not cross and not diagonal,
                DIAGONAL=diagonal, BLOCK=block, BLOCK_L=block_k, PRECISION=gram_precision,
                SPLIT_BF16=split_bf16)
    torch.sum(partial, 0, out=K)
    if not cross and not diagonal:
        K.copy_(K.triu() + K.triu(1).T)  # only tiles on and above the diagonal were computed
    return K


def gram_tokens(t1, E1, t2, E2, groups, bias, diagonal, route):
    """K (B1 × B2, or diag: B1) in fp32 for token matrices t1/t2 (token_rows.Tokens) and output
    gradients E1/E2 (B, T, groups · d_out); t2 is t1 for the symmetric Gram (and its diagonal);
    the diagonal of a cross-Gram needs B1 = B2."""
    K = torch.empty((t1.B,) if diagonal else (t1.B, t2.B), device=E1.device,
                    dtype=torch.float32)
    if K.numel() == 0:
        return K
    if t1.T == 0 or t1.cols + int(bias) == 0 or E1.shape[2] == 0:
        return K.zero_()  # no tokens or no parameters: every per-sample gradient is empty
    run = _token_pair if route == "token_pair" else _per_sample
    return run(t1, E1, t2, E2, groups, bias, diagonal, K, input_precision(E1.dtype))


def gram_linear(A, E, bias=False, A2=None, E2=None, diagonal=False, route="token_pair"):
    """K = UᵀU (or U1ᵀU2, or diag(UᵀU)) in fp32 for a linear layer; A (B[, T], d_in),
    E (B[, T], d_out) (fp32, fp16, bf16 on GPU); route "token_pair" or "per_sample"."""
    t1 = linear_tokens(A)
    t2 = linear_tokens(A2) if A2 is not None else t1
    E1 = output_tokens(E)
    return gram_tokens(t1, E1, t2, output_tokens(E2) if A2 is not None else E1, 1, bias,
                       diagonal, route)
