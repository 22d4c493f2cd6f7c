"""Reference project_linear: pure PyTorch, float64-capable, any device."""
import torch

from .gram_linear import as_tokens


def project_linear(A, E, V, V_bias=None, groups=1):
    """(Uᵀ V)_i = ⟨g_i, V⟩ = Σ_t e_itᵀ V a_it (+ Σ_t e_it·V_bias): per group, Y = A Vᵀ over all
    (i, t) rows, then rowwise dots with E summed over tokens. A (B[, T], d_in), E (B[, T], d_out);
    V (d_out, d_in/groups) -> (B,); V (m, d_out, d_in/groups) -> (B, m); V_bias (d_out,) or
    (m, d_out). float64 E gives float64, anything else float32."""
    dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    A, E = as_tokens(A.to(dtype), groups), as_tokens(E.to(dtype), groups)
    B, T, G, d_out = E.shape
    Vm = (V if V.dim() == 3 else V[None]).to(dtype).unflatten(1, (G, d_out))  # m, G, d_out, k
    m = Vm.shape[0]
    out = A.new_zeros((B * T, m))
    for g in range(G):
        d_in = A.shape[-1]
        # (B T) × (m d_out)
        Y = A[:, :, g].reshape(B * T, d_in) @ Vm[:, g].reshape(m * d_out, d_in).T
        if V_bias is not None:
            vb = (V_bias if V_bias.dim() == 2 else V_bias[None]).to(dtype)
            Y = Y + vb.unflatten(1, (G, d_out))[:, g].reshape(1, m * d_out)
        out += (Y.view(B * T, m, d_out) * E[:, :, g].reshape(B * T, 1, d_out)).sum(-1)
    out = out.view(B, T, m).sum(1)
    return out if V.dim() == 3 else out[:, 0]
