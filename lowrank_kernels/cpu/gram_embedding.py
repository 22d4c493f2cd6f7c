"""CPU gram_embedding: K_ij = Σ_{t,s} [idx_it = idx2_js ≠ padding] (e_it · e2_js), by the cheaper of two exact
routes:

- token pair: one masked GEMM over all token pairs (2·BT·B2T2·d flops; the reference's small
  route);
- used rows: the per-sample gradients restricted to the R table rows that occur,
  M_i = [g_i[r] for the used r] (B × R·d, one index_add_), then K = M M2ᵀ: 2·B·B2·R·d flops
  (R ≤ BT; text has many repeated tokens), built in blocks of rows of bounded size.

diagonal=True takes the reference's coalesced per-(sample, row) sums (already O(B·T·d))."""
import torch

from ..reference.gram_embedding import _token_pairs
from ..reference.gram_embedding import gram_embedding as reference_gram_embedding
from ._common import acc_dtype, mirror_upper, upper_row_blocks

# Entries (samples × used rows × d) of one block of restricted per-sample gradients.
_ROWS_BLOCK = 1 << 22
# Largest (BT) × (B2 T2) token-pair block of the token-pair route.
_PAIR_BLOCK = 1 << 22
# Flop-equivalents per entry: token-pair mask and product; writing and reading M.
_PAIR_ELEMENT_COST = 8
_ROW_ELEMENT_COST = 6


def _used_rows(idx, E, rank, R, dtype):
    """M (B, R·d), a strided view: M[i, r] = Σ_t [rank_it = r] e_it for r < R (tokens of rank R,
    padding and rows outside the block, go to a dummy slot that the view leaves out)."""
    B, T = idx.shape
    d = E.shape[-1]
    sample = torch.arange(B, device=idx.device).repeat_interleave(T)
    M = E.new_zeros((B * (R + 1), d), dtype=dtype)
    M.index_add_(0, sample * (R + 1) + rank, E.reshape(B * T, d).to(dtype))
    return M.view(B, (R + 1) * d)[:, :R * d]


def gram_embedding(idx, E, num_embeddings, padding_idx=None, idx2=None, E2=None,
                   diagonal=False):
    """K_ij = Σ_{t,s} [idx_it = idx2_js ≠ padding_idx] (e_it · e2_js), the arguments and the
    result as lowrank_kernels.reference.gram_embedding. float64 E gives float64, anything
    else float32 (fp32 accumulation)."""
    if diagonal:
        return reference_gram_embedding(idx, E, num_embeddings, padding_idx, idx2, E2, True)
    dtype = acc_dtype(E)
    cross = idx2 is not None
    (B, T) = idx.shape
    (B2, T2) = idx2.shape if cross else (B, T)
    d = E.shape[-1]
    rows = idx.reshape(-1) if not cross else torch.cat([idx.reshape(-1), idx2.reshape(-1)])
    if padding_idx is not None:
        rows = torch.where(rows == padding_idx, torch.full_like(rows, -1), rows)
    if B * T == 0 or B2 * T2 == 0:
        return E.new_zeros((B, B2), dtype=dtype)
    uniq, inverse = torch.unique(rows, return_inverse=True)
    R = uniq.numel()
    if padding_idx is not None and bool(uniq[0] < 0):  # rank 0 is padding: to the dummy slot
        R -= 1
        inverse = torch.where(inverse == 0, torch.full_like(inverse, R), inverse - 1)
    pairs = B * T * B2 * T2 if cross else B * T * (B * T + 1) // 2
    row_pairs = B * B2 if cross else B * (B + 1) // 2
    token_pair = pairs * (2 * d + _PAIR_ELEMENT_COST)
    used_rows = 2 * row_pairs * R * d + _ROW_ELEMENT_COST * (B + (B2 if cross else 0)) * R * d
    if token_pair <= used_rows and B * T * B2 * T2 <= _PAIR_BLOCK:
        return _token_pairs(idx, E, padding_idx, idx2, E2, dtype)
    K = E.new_zeros((B, B2), dtype=dtype)
    step = max(1, _ROWS_BLOCK // max(1, (B + (B2 if cross else 0)) * d))  # used rows per block
    inv1, inv2 = inverse[:B * T], inverse[B * T:]
    for lo in range(0, R, step):
        hi = min(lo + step, R)
        width = hi - lo

        def block(inv, idx_, E_):
            local = inv - lo
            local = torch.where((local >= 0) & (local < width), local, torch.full_like(local, width))
            return _used_rows(idx_, E_, local, width, dtype) if width * d else None

        M1 = block(inv1, idx, E)
        if M1 is None:
            continue
        if cross:
            K.addmm_(M1, block(inv2, idx2, E2).T)
        else:
            for r0, r1 in upper_row_blocks(B):
                K[r0:r1, r0:].addmm_(M1[r0:r1], M1[r0:].T)
    return K if cross else mirror_upper(K)
