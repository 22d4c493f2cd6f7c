"""Triton kernel of the embedding per-sample-gradient Gram
K_ij = Σ_{t,s} [idx_it = idx2_js ≠ padding] (e_it · e2_js), by token pairs with the
index-equality mask: one program per (sample pair, block of sample i's tokens); a block of
token pairs whose indices never match is skipped before any product is formed. Partial sums
go to a (pairs × token blocks) workspace that torch sums in a fixed order (deterministic)."""
import torch
import triton
import triton.language as tl


@triton.jit
def _gram_embedding_kernel(IDX1, si0, si1, E1, se0, se1, se2, T1,
                           IDX2, sj0, sj1, E2, sf0, sf1, sf2, T2,
                           d, PAIR_I, PAIR_J, PARTIAL, n_tblocks, padding_idx,
                           HAS_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                           BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                           PRECISION: tl.constexpr):
    p = tl.program_id(0)
    tb = tl.program_id(1)
    i = tl.load(PAIR_I + p).to(tl.int64)
    j = tl.load(PAIR_J + p).to(tl.int64)
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    t_in = t < T1
    idx_t = tl.load(IDX1 + i * si0 + t * si1, mask=t_in, other=-1)
    valid_t = t_in
    if HAS_PAD:
        valid_t = valid_t & (idx_t != padding_idx)
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    total = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
    for s0 in range(0, T2, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
        s_in = s < T2
        idx_s = tl.load(IDX2 + j * sj0 + s * sj1, mask=s_in, other=-2)
        equal = (idx_t[:, None] == idx_s[None, :]) & valid_t[:, None] & s_in[None, :]
        if tl.sum(equal.to(tl.int32)) > 0:
            dots = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
            for d0 in range(0, d, BLOCK_D):
                k = d0 + cols
                k_in = k < d
                e_t = tl.load(E1 + i * se0 + t[:, None] * se1 + k[None, :] * se2,
                              mask=t_in[:, None] & k_in[None, :], other=0.0)
                e_s = tl.load(E2 + j * sf0 + s[:, None] * sf1 + k[None, :] * sf2,
                              mask=s_in[:, None] & k_in[None, :], other=0.0)
                dots = tl.dot(e_t, tl.trans(e_s), dots, input_precision=PRECISION)
            total += tl.where(equal, dots, 0.0)
    tl.store(PARTIAL + p * n_tblocks + tb, tl.sum(tl.sum(total, axis=1), axis=0))


def _input_precision(dtype):
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def gram_embedding(idx, E, num_embeddings, padding_idx=None, idx2=None, E2=None,
                   diagonal=False):
    """K_ij = Σ_{t,s} [idx_it = idx2_js ≠ padding_idx] (e_it · e2_js) in fp32 (B × B2, or
    its diagonal (B) with diagonal=True). idx (B, T) int64, E (B, T, d) fp32/fp16 (bf16 on
    GPU); idx2/E2 default to idx/E."""
    B, T1 = idx.shape
    cross = idx2 is not None
    if not cross:
        idx2, E2 = idx, E
    B2, T2 = idx2.shape
    device = idx.device
    if diagonal:
        pair_i = pair_j = torch.arange(B, device=device)
    elif cross:
        pair_i = torch.arange(B, device=device).repeat_interleave(B2)
        pair_j = torch.arange(B2, device=device).repeat(B)
    else:
        pair_i, pair_j = torch.triu_indices(B, B, device=device)
    n_pairs = pair_i.numel()
    if diagonal:
        shape = (B,)
    else:
        shape = (B, B2)
    if n_pairs == 0 or T1 == 0 or T2 == 0 or E.shape[-1] == 0:
        return torch.zeros(shape, device=device, dtype=torch.float32)
    block_t = 32 if T1 > 16 else 16
    block_s = 32 if T2 > 16 else 16
    n_tblocks = triton.cdiv(T1, block_t)
    partial = torch.empty((n_pairs, n_tblocks), device=device, dtype=torch.float32)
    _gram_embedding_kernel[(n_pairs, n_tblocks)](
        idx, idx.stride(0), idx.stride(1), E, E.stride(0), E.stride(1), E.stride(2), T1,
        idx2, idx2.stride(0), idx2.stride(1), E2, E2.stride(0), E2.stride(1), E2.stride(2), T2,
        E.shape[-1], pair_i.contiguous(), pair_j.contiguous(), partial, n_tblocks,
        -1 if padding_idx is None else padding_idx, HAS_PAD=padding_idx is not None,
        BLOCK_T=block_t, BLOCK_S=block_s, BLOCK_D=32, PRECISION=_input_precision(E.dtype))
    values = partial.sum(1)
    if diagonal:
        return values
    K = torch.empty(shape, device=device, dtype=torch.float32)
    K[pair_i, pair_j] = values
    if not cross:
        K[pair_j, pair_i] = values
    return K
