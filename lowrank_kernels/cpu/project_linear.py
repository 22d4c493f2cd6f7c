"""CPU project_linear: (Uᵀ V)_i = ⟨g_i, V⟩ = Σ_t e_itᵀ V a_it for m directions at once, by the cheaper of two
exact routes (per group):

- GEMM + dot: Y = A Vᵀ (or E V, the narrower side) over all (i, t) rows as ONE GEMM for all m
  directions, then rowwise dots with E (or A): 2·B·T·m·d_in·d_out flops;
- per sample: G_i = E_iᵀ A_i by one bmm (blocks of d_out), then G V_flatᵀ: 2·B·T·d_in·d_out +
  2·B·m·d_in·d_out flops — cheaper when T > 1 and m > 1.
"""
import torch

from ._common import acc_dtype, as_tokens
from .weighted_sum_linear import choose_route

# Entries of a block of per-sample gradients (samples × parameters) held at once.
_GRAD_BLOCK = 1 << 22
# Entries of a block of the GEMM + dot route's Y (rows × m·width) held at once.
_ROW_BLOCK = 1 << 22


def _gemm_dot(A, E, V):
    """(B, m): Σ_t e_itᵀ V_m a_it for one group, A (B, T, k), E (B, T, d_out), V (m, d_out, k)."""
    B, T, k = A.shape
    m, d_out = V.shape[0], V.shape[1]
    if d_out <= k:  # Y = A Vᵀ: (rows, m, d_out), dotted with E
        X, Y_of, D, width = A.reshape(B * T, k), V.reshape(m * d_out, k).T, E, d_out
    else:  # Z = E V: (rows, m, k), dotted with A
        X, Y_of, D, width = E.reshape(B * T, d_out), V.transpose(0, 1).reshape(d_out, m * k), A, k
    D = D.reshape(B * T, 1, width)
    out = A.new_empty((B * T, m))
    step = max(1, _ROW_BLOCK // max(1, m * width))
    for lo in range(0, B * T, step):
        hi = min(lo + step, B * T)
        Y = (X[lo:hi] @ Y_of).view(hi - lo, m, width)
        out[lo:hi] = Y.mul_(D[lo:hi]).sum(-1)
    return out.view(B, T, m).sum(1)


def _per_sample(A, E, V):
    """(B, m) = G V_flatᵀ with G_i = E_iᵀ A_i, built in blocks of d_out rows."""
    B, T, k = A.shape
    m, d_out = V.shape[0], V.shape[1]
    out = A.new_zeros((B, m))
    step = max(1, _GRAD_BLOCK // max(1, B * k))
    for lo in range(0, d_out, step):
        hi = min(lo + step, d_out)
        G = torch.bmm(E[:, :, lo:hi].transpose(1, 2), A).view(B, (hi - lo) * k)
        out.addmm_(G, V[:, lo:hi].reshape(m, (hi - lo) * k).T)
    return out


def project_linear(A, E, V, V_bias=None, groups=1):
    """(Uᵀ V)_i = Σ_t e_itᵀ V a_it (+ Σ_t e_it·V_bias), the arguments and the result as
    lowrank_kernels.reference.project_linear ((B,) or (B, m)). float64 A gives float64,
    anything else float32 (fp32 accumulation)."""
    dtype = acc_dtype(A)
    A4, E4 = as_tokens(A.to(dtype), groups), as_tokens(E.to(dtype), groups)
    B, T, G, k = A4.shape
    d_out = E4.shape[-1]
    Vm = (V if V.dim() == 3 else V[None]).to(dtype).unflatten(1, (G, d_out))  # m, G, d_out, k
    m = Vm.shape[0]
    route = choose_route(B, T, k, d_out, m)
    out = None
    for g in range(G):
        Ag, Eg, Vg = A4[:, :, g], E4[:, :, g], Vm[:, g]
        part = _per_sample(Ag, Eg, Vg) if route == "per_sample" or B * T == 0 else \
            _gemm_dot(Ag, Eg, Vg)
        out = part if out is None else out.add_(part)
    if out is None:
        out = A4.new_zeros((B, m))
    if V_bias is not None:
        vb = (V_bias if V_bias.dim() == 2 else V_bias[None]).to(dtype)  # m × G d_out
        out.addmm_(E4.sum(1).flatten(1), vb.T)
    return out if V.dim() == 3 else out[:, 0]
