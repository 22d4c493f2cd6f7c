"""Reference gram_linear: pure PyTorch, float64-capable, any device."""
import torch

# Largest block of token-pair products (samples × samples × groups × T × T) held at once.
_PAIR_BLOCK = 1 << 22
# Largest block of per-sample gradients (samples × parameters) held at once.
_GRAD_BLOCK = 1 << 24


def as_tokens(X, groups=1):
    """(B, d) or (B, T, d) -> (B, T, groups, d / groups): the token rows split by group."""
    X = X if X.dim() == 3 else X[:, None]
    return X.unflatten(-1, (groups, X.shape[-1] // groups))


def _token_pair(A, E, A2, E2, b, diagonal):
    """K_ij = Σ_g Σ_{t,s} (a_it·a2_js + b)(e_it·e2_js) over group slices, in sample blocks."""
    B1, T, G, _ = A.shape
    B2 = A2.shape[0]
    out = A.new_empty((B1,) if diagonal else (B1, B2))
    step = max(1, _PAIR_BLOCK // max(1, (1 if diagonal else B2) * G * T * T))
    for lo in range(0, B1, step):
        hi = min(lo + step, B1)
        if diagonal:
            xa = torch.einsum("itgk,isgk->igts", A[lo:hi], A2[lo:hi])
            xe = torch.einsum("itgk,isgk->igts", E[lo:hi], E2[lo:hi])
            out[lo:hi] = ((xa + b) * xe).sum((1, 2, 3))
        else:
            xa = torch.einsum("itgk,jsgk->ijgts", A[lo:hi], A2)
            xe = torch.einsum("itgk,jsgk->ijgts", E[lo:hi], E2)
            out[lo:hi] = ((xa + b) * xe).sum((2, 3, 4))
    return out


def _per_sample(A, E, A2, E2, bias, diagonal):
    """K = G1 G2ᵀ with G_i = E_iᵀ [A_i, 1] built per group and block of output rows."""
    def augmented(X):
        return torch.cat([X, X.new_ones(X.shape[:-1] + (1,))], -1) if bias else X

    A, A2 = augmented(A), augmented(A2)
    B1, _, G, d_out = E.shape
    B2 = E2.shape[0]
    out = A.new_zeros((B1,) if diagonal else (B1, B2))
    step = max(1, _GRAD_BLOCK // max(1, (B1 + B2) * A.shape[-1]))
    for g in range(G):
        for lo in range(0, d_out, step):
            G1 = torch.einsum("bto,btk->bok", E[:, :, g, lo:lo + step], A[:, :, g]).flatten(1)
            G2 = torch.einsum("bto,btk->bok", E2[:, :, g, lo:lo + step], A2[:, :, g]).flatten(1)
            out += (G1 * G2).sum(1) if diagonal else G1 @ G2.T
    return out


def gram_linear(A, E, bias=False, A2=None, E2=None, diagonal=False, route="token_pair",
                groups=1):
    """K_ij = ⟨g_i, h_j⟩ = Σ_{t,s} (a_it·a2_js + b)(e_it·e2_js), the (cross-)Gram of the per-sample
    gradients g_i = Σ_t e_it ã_itᵀ of a linear layer (ã = [a, 1] with bias, b = 1), h_j the same of
    (A2, E2) (default: A, E). A (B, d_in) or (B, T, d_in), E (B, d_out) or (B, T, d_out).
    diagonal=True returns diag(K) (B; with A2/E2: ⟨g_i, h_i⟩, B2 = B). groups > 1: a
    block-diagonal weight (grouped conv after unfold): K is the sum of the groups' Grams over
    their column slices of A and E.
    route: "token_pair" (T×T token products per pair) or "per_sample" (per-sample gradients in
    bounded blocks). float64 in gives float64 out, anything else float32."""
    dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    cross = A2 is not None
    A1, E1 = as_tokens(A.to(dtype), groups), as_tokens(E.to(dtype), groups)
    A2 = as_tokens(A2.to(dtype), groups) if cross else A1
    E2 = as_tokens(E2.to(dtype), groups) if cross else E1
    if route == "token_pair":
        K = _token_pair(A1, E1, A2, E2, 1.0 if bias else 0.0, diagonal)
    else:
        K = _per_sample(A1, E1, A2, E2, bias, diagonal)
    if not cross and not diagonal:
        K = (K + K.T) / 2  # exactly symmetric
    return K
