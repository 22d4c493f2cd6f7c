"""CPU weighted_sum_embedding: (U C)[m, r] = Σ_{i,t: idx_it = r ≠ padding} C_im e_it — the m scaled copies of
the token rows built in one broadcast multiply (padding tokens weighted 0: no filtering, no
repeat_interleave) and scattered with one index_add_ along the table rows."""
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
    weights = C.T[:, :, None].expand(m, B, T)
    if padding_idx is not None:
        weights = weights * (idx != padding_idx)
    scaled = E.new_empty((m, B, T, d), dtype=dtype)  # m × (B T) × d, row-major
    torch.mul(weights[..., None], E.to(dtype)[None], out=scaled)
    out = E.new_zeros((m, num_embeddings, d), dtype=dtype)
    out.index_add_(1, idx.reshape(-1), scaled.view(m, B * T, d))
    return out if c.dim() == 2 else out[0]
