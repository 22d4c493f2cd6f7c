"""CPU project_embedding: (Uᵀ V)_{i,m} = Σ_t [idx_it ≠ padding] e_it · V_m[idx_it] — one gather of the used
rows of all m directions (index_select) and one batched GEMV per sample (bmm), no product
temporary."""
import torch

from ._common import acc_dtype


def project_embedding(idx, E, V, padding_idx=None):
    """(Uᵀ V)_i = Σ_t [idx_it ≠ padding_idx] e_it · V[idx_it], as
    lowrank_kernels.reference.project_embedding: idx (B, T) int64, E (B, T, d),
    V (num_embeddings, d) -> (B,); V (m, num_embeddings, d) -> (B, m). float64 E gives
    float64, anything else float32 (fp32 accumulation)."""
    dtype = acc_dtype(E)
    B, T = idx.shape
    d = E.shape[-1]
    Vm = (V if V.dim() == 3 else V[None]).to(dtype)  # m × N × d
    m = Vm.shape[0]
    vecs = E.to(dtype)
    if padding_idx is not None:
        vecs = vecs * (idx != padding_idx)[:, :, None].to(dtype)
    gathered = Vm.index_select(1, idx.reshape(-1)).view(m, B, T * d)  # m × B × (T d)
    out = torch.bmm(gathered.transpose(0, 1), vecs.reshape(B, T * d, 1)).view(B, m)
    return out if V.dim() == 3 else out[:, 0]
