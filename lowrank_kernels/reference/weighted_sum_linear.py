"""Reference weighted_sum_linear: pure PyTorch, float64-capable, any device."""
import torch

from .gram_linear import as_tokens


def weighted_sum_linear(A, E, c, bias=False, groups=1):
    """U c = Σ_i c_i g_i with g_i = Σ_t e_it a_itᵀ: W = (c ⊙ E)ᵀ A over all (i, t) rows, one
    GEMM per group. A (B[, T], d_in), E (B[, T], d_out); c (B,) -> W (d_out, d_in/groups) and
    the bias part Σ_{i,t} c_i e_it (d_out,); c (B, m) -> (m, d_out, d_in/groups), (m, d_out).
    Returns (W, bias part or None). float64 E gives float64, anything else float32."""
    dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    A, E = as_tokens(A.to(dtype), groups), as_tokens(E.to(dtype), groups)
    B, T, G, d_out = E.shape
    C = (c if c.dim() == 2 else c[:, None]).to(dtype)  # B × m
    rows_c = C.repeat_interleave(T, 0)  # (B T) × m
    E_rows, A_rows = E.reshape(B * T, G, d_out), A.reshape(B * T, G, A.shape[-1])
    # (m, G, d_out, d_in/G): per group, (C ⊙ E)ᵀ A with the row scaling in the GEMM's operand.
    W = torch.stack([(rows_c.T[:, :, None] * E_rows[None, :, g]).transpose(1, 2) @ A_rows[:, g]
                     for g in range(G)], 1).flatten(1, 2)
    b = (rows_c.T @ E_rows.flatten(1)) if bias else None  # m × d_out
    if c.dim() == 1:
        return W[0], (b[0] if bias else None)
    return W, b
