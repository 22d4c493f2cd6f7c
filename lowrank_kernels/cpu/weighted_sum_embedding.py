"""CPU weighted_sum_embedding: (U C)[m, r] = Σ_{i,t: idx_it = r ≠ padding} C_im e_it — the m scaled copies of
the token rows built in one broadcast multiply (padding tokens weighted 0, no filtering) and
scattered with one index_add_ along the table rows."""
import torch

from ._common import acc_dtype


def weighted_sum_embedding(idx, E, c, num_embeddings, padding_idx=None):
    """U c = Σ_i c_i g_i for an nn.Embedding weight, as
    lowrank_kernels.reference.weighted_sum_embedding: idx (B, T) int64, E (B, T, d), c (B,)
    -> (num_embeddings, d); c (B, m) -> (m, num_embeddings, d). float64 E gives float64,
    anything else float32 (fp32 accumulation)."""
    dtype = acc_dtype(E)
    B, T = idx.shape
    d = E.shape[-1]
    C = (c if c.dim() == 2 else c[:, None]).to(dtype)  # B × m
    m = C.shape[1]
    weights = C[:, None, :].expand(B, T, m)
    if padding_idx is not None:
        weights = weights * (idx != padding_idx)[:, :, None]
    scaled = (E.to(dtype)[:, :, None, :] * weights[..., None]).view(B * T, m, d)
    out = E.new_zeros((m, num_embeddings, d), dtype=dtype)
    out.transpose(0, 1).index_add_(0, idx.reshape(-1), scaled)
    return out if c.dim() == 2 else out[0]
