"""Reference project_embedding: pure PyTorch, float64-capable, any device."""
import torch


def project_embedding(idx, E, V, padding_idx=None):
    """(Uᵀ V)_i = ⟨g_i, V⟩ = Σ_t [idx_it ≠ padding_idx] e_it · V[idx_it] (a gather and a dot).
    idx (B, T) int64, E (B, T, d), V (num_embeddings, d) -> (B,); V (m, num_embeddings, d)
    -> (B, m). float64 E gives float64, anything else float32."""
    dtype = torch.float64 if E.dtype == torch.float64 else torch.float32
    B, T = idx.shape
    Vm = (V if V.dim() == 3 else V[None]).to(dtype)  # m × N × d
    vecs = E.to(dtype)
    weight = torch.ones_like(idx, dtype=dtype) if padding_idx is None else \
        (idx != padding_idx).to(dtype)
    # (m, B, T): e_it · V_k[idx_it], chunked over k to bound the gathered m × B × T × d block.
    out = vecs.new_empty((B, Vm.shape[0]))
    step = max(1, (1 << 24) // max(1, idx.numel() * E.shape[-1]))
    for lo in range(0, Vm.shape[0], step):
        gathered = Vm[lo:lo + step][:, idx]  # k × B × T × d
        out[:, lo:lo + step] = ((gathered * vecs[None]).sum(-1) * weight[None]).sum(-1).T
    return out if V.dim() == 3 else out[:, 0]
