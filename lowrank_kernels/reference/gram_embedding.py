"""Reference gram_embedding: pure PyTorch, float64-capable, any device."""
import torch

# Largest (coalesced entries of one chunk) x (coalesced entries of the other side) block of
# token-pair products held at once.
_PAIR_BLOCK = 1 << 22


def coalesce(idx, E, num_embeddings, padding_idx, dtype):
    """The nonzero rows of every per-sample gradient: g_i[r] = Σ_t [idx_it = r ≠ padding] e_it.

    Returns (sample, row, G): one entry per distinct (i, r) pair, sorted by i then r, with
    G (n × d) in `dtype`."""
    B, T = idx.shape
    rows = idx.reshape(-1)
    vecs = E.reshape(B * T, E.shape[-1]).to(dtype)
    sample = torch.arange(B, device=idx.device).repeat_interleave(T)
    if padding_idx is not None:
        keep = rows != padding_idx
        rows, vecs, sample = rows[keep], vecs[keep], sample[keep]
    keys, inverse = torch.unique(sample * num_embeddings + rows, return_inverse=True)
    G = vecs.new_zeros((keys.numel(), vecs.shape[1])).index_add_(0, inverse, vecs)
    return keys // num_embeddings, keys % num_embeddings, G


def _token_pairs(idx, E, padding_idx, idx2, E2, dtype):
    """K = Σ_{t,s} [idx_it = idx2_js ≠ padding] e_it·e2_js as one (B T) × (B2 T2) masked GEMM."""
    cross = idx2 is not None
    idx2, E2 = (idx2, E2) if cross else (idx, E)
    (B, T), (B2, T2) = idx.shape, idx2.shape
    rows1, rows2 = idx.reshape(-1), idx2.reshape(-1)
    E1 = E.reshape(B * T, E.shape[-1]).to(dtype)
    E2 = E1 if not cross else E2.reshape(B2 * T2, E2.shape[-1]).to(dtype)
    mask = rows1[:, None] == rows2[None, :]
    if padding_idx is not None:
        mask &= (rows1 != padding_idx)[:, None]
    K = ((E1 @ E2.T) * mask).view(B, T, B2, T2).sum((1, 3))
    return K if cross else (K + K.T) / 2


def gram_embedding(idx, E, num_embeddings, padding_idx=None, idx2=None, E2=None,
                   diagonal=False):
    """K_ij = Σ_{t,s} [idx_it = idx2_js ≠ padding_idx] (e_it · e2_js): the (cross-)Gram of the
    per-sample gradients of an nn.Embedding weight, g_i = Σ_t onehot(idx_it) e_itᵀ, without
    forming them. idx (B, T) int64, E (B, T, d); idx2/E2 (B2, T2[, d]) for the cross-Gram
    (default: idx/E). diagonal=True returns diag(K) (B). float64 in gives float64 out,
    anything else float32.

    Route: small problems take one masked GEMM over all token pairs; larger ones coalesce
    each side to its distinct (sample, row) entries (index_add_), then sum the products of
    entries that share a row, in blocks of bounded size."""
    dtype = torch.float64 if E.dtype == torch.float64 else torch.float32
    B = idx.shape[0]
    if not diagonal and idx.numel() * (idx if idx2 is None else idx2).numel() <= _PAIR_BLOCK:
        return _token_pairs(idx, E, padding_idx, idx2, E2, dtype)
    s1, r1, G1 = coalesce(idx, E, num_embeddings, padding_idx, dtype)
    cross = idx2 is not None
    if cross:
        s2, r2, G2 = coalesce(idx2, E2, num_embeddings, padding_idx, dtype)
    if diagonal:
        if not cross:
            return G1.new_zeros(B).index_add_(0, s1, (G1 * G1).sum(1))
        # Entries with the same (sample, row) key on both sides (keys sorted, unique).
        k1, k2 = s1 * num_embeddings + r1, s2 * num_embeddings + r2
        pos = torch.searchsorted(k2, k1).clamp_(max=max(k2.numel() - 1, 0))
        match = k2[pos] == k1 if k2.numel() else torch.zeros_like(k1, dtype=torch.bool)
        dots = (G1[match] * G2[pos[match]]).sum(1)
        return G1.new_zeros(B).index_add_(0, s1[match], dots)
    if not cross:
        s2, r2, G2 = s1, r1, G1
    B2 = idx2.shape[0] if cross else B
    K = G1.new_zeros((B, B2))
    chunk = max(1, _PAIR_BLOCK // max(1, G2.shape[0]))
    for lo in range(0, G1.shape[0], chunk):
        hi = min(lo + chunk, G1.shape[0])
        pairs = (G1[lo:hi] @ G2.T) * (r1[lo:hi, None] == r2[None, :])
        per_sample = pairs.new_zeros((hi - lo, B2)).index_add_(1, s2, pairs)
        K.index_add_(0, s1[lo:hi], per_sample)
    if not cross:
        K = (K + K.T) / 2  # exactly symmetric
    return K
