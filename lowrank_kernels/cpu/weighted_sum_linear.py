"""CPU weighted_sum_linear: U C = Σ_i c_i g_i, g_i = Σ_t e_it a_itᵀ, for m coefficient columns at once,
by the cheaper of two exact routes (per group):

- scaled GEMM: W = (C ⊙ E)ᵀ A over all (i, t) rows as ONE GEMM for all m columns (the scaling
  applied to the narrower of E and A): 2·B·T·m·d_in·d_out flops;
- per sample: G_i = E_iᵀ A_i by one bmm (blocks of d_out), then W = Cᵀ G: 2·B·T·d_in·d_out +
  2·B·m·d_in·d_out flops — cheaper when T > 1 and m > 1 (a factor m·T/(T + m)).
"""
import torch

from ._common import acc_dtype, as_tokens

# Entries of a block of per-sample gradients (samples × parameters) held at once.
_GRAD_BLOCK = 1 << 22
# Flop-equivalents of writing and reading one per-sample gradient entry, and of one scaled
# operand entry (fitted on a 2-core AVX2 CPU).
_GRAD_ELEMENT_COST = 6
_SCALE_ELEMENT_COST = 4


def choose_route(B, T, d_in, d_out, m):
    """'scaled' or 'per_sample' for one group of these sizes."""
    rows = B * T
    scaled = 2 * rows * m * d_in * d_out + _SCALE_ELEMENT_COST * rows * m * min(d_in, d_out)
    per_sample = (2 * rows * d_in * d_out + 2 * B * m * d_in * d_out
                  + _GRAD_ELEMENT_COST * B * d_in * d_out)
    return "scaled" if scaled <= per_sample else "per_sample"


def _scaled(A, E, C):
    """(m, d_out, k): (C ⊙ E)ᵀ A for one group, A (B, T, k), E (B, T, d_out), C (B, m)."""
    B, T, k = A.shape
    d_out, m = E.shape[-1], C.shape[1]
    if d_out <= k:  # scale E: (B T) × (m d_out)
        Es = (E[:, :, None, :] * C[:, None, :, None]).reshape(B * T, m * d_out)
        return (Es.T @ A.reshape(B * T, k)).view(m, d_out, k)
    As = (A[:, :, None, :] * C[:, None, :, None]).reshape(B * T, m * k)
    return (E.reshape(B * T, d_out).T @ As).view(d_out, m, k).transpose(0, 1)


def _per_sample(A, E, C, out):
    """out (m, d_out, k) = Cᵀ G with G_i = E_iᵀ A_i, built in blocks of d_out rows."""
    B, T, k = A.shape
    d_out, m = E.shape[-1], C.shape[1]
    step = max(1, _GRAD_BLOCK // max(1, B * k))
    for lo in range(0, d_out, step):
        hi = min(lo + step, d_out)
        G = torch.bmm(E[:, :, lo:hi].transpose(1, 2), A).view(B, (hi - lo) * k)
        out[:, lo:hi] = (C.T @ G).view(m, hi - lo, k)


def weighted_sum_linear(A, E, c, bias=False, groups=1):
    """U c = Σ_i c_i g_i: W = (c ⊙ E)ᵀ A over all (i, t) rows per group (the arguments and the
    result as lowrank_kernels.reference.weighted_sum_linear: (W, bias part or None)).
    float64 A gives float64, anything else float32 (fp32 accumulation)."""
    dtype = acc_dtype(A)
    A4, E4 = as_tokens(A.to(dtype), groups), as_tokens(E.to(dtype), groups)
    B, T, G, k = A4.shape
    d_out = E4.shape[-1]
    C = (c if c.dim() == 2 else c[:, None]).to(dtype)  # B × m
    m = C.shape[1]
    W = A4.new_empty((m, G * d_out, k))
    route = choose_route(B, T, k, d_out, m)
    for g in range(G):
        Ag, Eg = A4[:, :, g], E4[:, :, g]
        if B * T == 0 or route == "per_sample":
            Wg = W[:, g * d_out:(g + 1) * d_out]
            if B * T == 0:
                Wg.zero_()
            else:
                _per_sample(Ag, Eg, C, Wg)
        else:
            W[:, g * d_out:(g + 1) * d_out] = _scaled(Ag, Eg, C)
    b = (C.T @ E4.sum(1).flatten(1)) if bias else None  # m × d_out
    if c.dim() == 1:
        return W[0], (b[0] if bias else None)
    return W, b
