"""Triton kernel of the embedding projection (Uᵀ V)_i = Σ_t e_it · V[idx_it]: one program per
(sample i, direction k) gathers the rows V_k[idx_it] tile by tile and accumulates in fp32."""
import torch
import triton
import triton.language as tl


@triton.jit
def _project_embedding_kernel(IDX, si0, si1, T, E, se0, se1, se2, d,
                              V, sv0, sv1, sv2, OUT, m, padding_idx, tokens_per_split, B,
                              HAS_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                              BLOCK_D: tl.constexpr):
    # OUT[s, i, k] = Σ_{tokens t of split s} e_it · V_k[idx_it].
    i = tl.program_id(0).to(tl.int64)
    direction = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    t_lo = split * tokens_per_split
    for t0 in range(t_lo, tl.minimum(t_lo + tokens_per_split, T), BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        valid = t < T
        rows = tl.load(IDX + i * si0 + t * si1, mask=valid, other=0)
        if HAS_PAD:
            valid = valid & (rows != padding_idx)
        for d0 in range(0, d, BLOCK_D):
            k = d0 + cols
            mask = valid[:, None] & (k[None, :] < d)
            e = tl.load(E + i * se0 + t[:, None] * se1 + k[None, :] * se2, mask=mask,
                        other=0.0).to(tl.float32)
            v = tl.load(V + direction * sv0 + rows[:, None] * sv1 + k[None, :] * sv2,
                        mask=mask, other=0.0).to(tl.float32)
            acc += e * v
    tl.store(OUT + (split * B + i) * m + direction, tl.sum(tl.sum(acc, axis=1), axis=0))


def project_embedding(idx, E, V, padding_idx=None):
    """(Uᵀ V)_i = Σ_t e_it · V[idx_it] in fp32: (B,) for V (N, d), (B, m) for V (m, N, d).
    idx (B, T) int64, E (B, T, d) fp32/fp16 (bf16 on GPU); V any floating dtype."""
    B, T = idx.shape
    d = E.shape[-1]
    Vm = V if V.dim() == 3 else V[None]
    if Vm.dtype == torch.float64:
        Vm = Vm.float()  # the kernel accumulates in fp32; read V in fp32
    m = Vm.shape[0]
    if not (B and T and d and m):
        out = torch.zeros((B, m), device=E.device, dtype=torch.float32)
        return out if V.dim() == 3 else out[:, 0]
    # Token splits so that ≥ 2 × 132 programs run (a full wave or two of an H100); the split
    # partials are summed after in a fixed order (deterministic).
    block_t = 16
    splits = max(1, min(triton.cdiv(T, 4 * block_t), triton.cdiv(264, B * m)))
    tokens_per_split = triton.cdiv(triton.cdiv(T, splits), block_t) * block_t
    splits = triton.cdiv(T, tokens_per_split)
    out = torch.empty((splits, B, m), device=E.device, dtype=torch.float32)
    _project_embedding_kernel[(B, m, splits)](
        idx, idx.stride(0), idx.stride(1), T, E, E.stride(0), E.stride(1), E.stride(2), d,
        Vm, Vm.stride(0), Vm.stride(1), Vm.stride(2), out, m,
        -1 if padding_idx is None else padding_idx, tokens_per_split, B,
        HAS_PAD=padding_idx is not None, BLOCK_T=block_t, BLOCK_D=64 if d > 32 else 32)
    out = out[0] if splits == 1 else out.sum(0)
    return out if V.dim() == 3 else out[:, 0]
