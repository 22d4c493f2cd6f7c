"""Reference weighted_sum_embedding: pure PyTorch, float64-capable, any device."""
import torch


def weighted_sum_embedding(idx, E, c, num_embeddings, padding_idx=None):
    """U c = Σ_i c_i g_i, i.e. row r of the result is Σ_{i,t: idx_it = r ≠ padding_idx} c_i e_it
    (scatter-add with index_add_). idx (B, T) int64, E (B, T, d), c (B,) -> (num_embeddings, d);
    c (B, m) -> (m, num_embeddings, d). float64 E gives float64, anything else float32."""
    dtype = torch.float64 if E.dtype == torch.float64 else torch.float32
    B, T = idx.shape
    d = E.shape[-1]
    C = (c if c.dim() == 2 else c[:, None]).to(dtype)  # B × m
    rows = idx.reshape(-1)
    weights = C.repeat_interleave(T, dim=0)  # (B T) × m
    vecs = E.reshape(B * T, d).to(dtype)
    if padding_idx is not None:
        keep = rows != padding_idx
        rows, weights, vecs = rows[keep], weights[keep], vecs[keep]
    out = vecs.new_zeros((C.shape[1], num_embeddings, d))
    out.index_add_(1, rows, weights.T[:, :, None] * vecs[None])
    return out if c.dim() == 2 else out[0]
