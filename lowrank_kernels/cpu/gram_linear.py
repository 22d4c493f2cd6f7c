"""CPU gram_linear: K_ij = Σ_g Σ_{t,s} (a_it·a2_js + b)(e_it·e2_js), the (cross-)Gram of the per-sample
gradients g_i = Σ_t e_it ã_itᵀ of a linear layer, by the cheaper of two exact routes:

- token pair: X = (A Aᵀ + b) ⊙ (E Eᵀ) over token rows, summed per sample pair — for the
  symmetric K only the upper triangle, in block rows of GEMMs (T = 1: about 5/8 of the flops of
  two full GEMMs at B = 256); diagonal=True at T = 1 is row dots (‖a_i‖² + b)‖e_i‖²;
- per sample: G_i = E_iᵀ Ã_i by one bmm (in bounded blocks of d_out), then K = G Gᵀ.

route "auto" picks by `choose_route`, a flop model whose memory terms were fitted to
measurements on a 2-core AVX2 CPU (torch 2.13, MKL)."""
import torch

from ._common import acc_dtype, as_tokens, mirror_upper, upper_row_blocks

# Entries of a block of token-pair products (rows × columns of X) held at once.
_PAIR_BLOCK = 1 << 20
# Entries of a block of per-sample gradients (samples × parameters) held at once.
_GRAD_BLOCK = 1 << 22
# Flop-equivalents of one elementwise pass over an entry of X (token pair: +b, ⊙, the sum)
# and of writing and reading one per-sample gradient entry (fitted, see the module docstring).
_PAIR_ELEMENT_COST = 12
_GRAD_ELEMENT_COST = 6


def choose_route(B1, B2, T, d_in, d_out, groups, bias, cross, diagonal):
    """'token_pair' or 'per_sample', the cheaper for these sizes (per group d_in, d_out)."""
    pairs = B1 if diagonal else (B1 * B2 if cross else B1 * (B1 + 1) // 2)
    samples = B1 + B2 if cross else B1
    params = d_out * (d_in + int(bias))
    token_pair = pairs * T * T * (2 * (d_in + d_out) + _PAIR_ELEMENT_COST)
    per_sample = (2 * samples * T * params + 2 * pairs * params
                  + _GRAD_ELEMENT_COST * samples * params)
    return "token_pair" if groups * token_pair <= groups * per_sample else "per_sample"


def d_in_d_out_cheaper(d_in, d_out, bias):
    """T = 1: the token-pair route (two Grams of widths d_in, d_out) is cheaper than the Gram of
    the Khatri–Rao rows (width d_out·(d_in + b)) unless a width is about 1."""
    return d_in + d_out <= d_out * (d_in + int(bias))


def _row_dots(X, Y):
    """Σ_k X[..., k] Y[..., k] (one pass, no product temporary)."""
    return torch.linalg.vecdot(X, Y)


def _diagonal_token_pair(A, E, A2, E2, b):
    """diag: Σ_g Σ_{t,s} (a_it·a2_is + b)(e_it·e2_is); A (B, T, G, k)."""
    B, T, G, _ = A.shape
    if T == 1:
        xa, xe = _row_dots(A[:, 0], A2[:, 0]), _row_dots(E[:, 0], E2[:, 0])  # (B, G)
        out = xe.mul_(xa.add_(b)) if b else xe.mul_(xa)
        return out.sum(1) if G > 1 else out[:, 0]
    out = A.new_empty(B)
    step = max(1, _PAIR_BLOCK // max(1, G * T * T))
    for lo in range(0, B, step):
        hi = min(lo + step, B)

        def pair_dots(X, Y):  # (samples·G, T, T)
            X = X[lo:hi].transpose(1, 2).flatten(0, 1)
            Y = Y[lo:hi].transpose(1, 2).flatten(0, 1)
            return torch.bmm(X, Y.transpose(1, 2))

        xa, xe = pair_dots(A, A2), pair_dots(E, E2)
        prod = torch.addcmul(xe, xa, xe) if b else xa.mul_(xe)
        out[lo:hi] = prod.reshape(hi - lo, G * T * T).sum(1)
    return out


def _t1_symmetric(A, E, b):
    """(A Aᵀ + b) ⊙ (E Eᵀ) for 2-D A, E: upper block rows, then mirrored."""
    B = A.shape[0]
    blocks = upper_row_blocks(B)
    if len(blocks) == 1:  # small B: two full GEMMs
        xa, xe = A @ A.T, E @ E.T
        return mirror_upper(torch.addcmul(xe, xa, xe) if b else xa.mul_(xe))
    K = A.new_empty((B, B))
    for r0, r1 in blocks:
        xa = A[r0:r1] @ A[r0:].T
        xe = E[r0:r1] @ E[r0:].T
        if b:
            torch.addcmul(xe, xa, xe, out=K[r0:r1, r0:])
        else:
            torch.mul(xa, xe, out=K[r0:r1, r0:])
    return mirror_upper(K)


def _token_pair(A, E, A2, E2, b, cross):
    """K_ij = Σ_g Σ_{t,s} (a_it·a2_js + b)(e_it·e2_js) by GEMMs over token rows, per group;
    symmetric K: upper block rows of samples only, then mirrored."""
    B1, T, G, _ = A.shape
    B2 = A2.shape[0]
    if not cross and G == 1 and T == 1:
        return _t1_symmetric(A[:, 0, 0], E[:, 0, 0], b)
    K = A.new_zeros((B1, B2))
    for g in range(G):
        Af, Ef = A[:, :, g].flatten(0, 1), E[:, :, g].flatten(0, 1)
        A2f = A2[:, :, g].flatten(0, 1) if cross else Af
        E2f = E2[:, :, g].flatten(0, 1) if cross else Ef
        if cross:
            step = max(1, _PAIR_BLOCK // max(1, T * T * B2))
            blocks = [(lo, min(lo + step, B1)) for lo in range(0, B1, step)]
        else:
            fits = max(1, _PAIR_BLOCK // max(1, T * T * B1))  # sample rows per block
            blocks = upper_row_blocks(B1, None if fits >= B1 else fits)
        for r0, r1 in blocks:
            c0 = 0 if cross else r0
            xa = Af[r0 * T:r1 * T] @ A2f[c0 * T:].T
            xe = Ef[r0 * T:r1 * T] @ E2f[c0 * T:].T
            prod = torch.addcmul(xe, xa, xe) if b else xa.mul_(xe)
            block = prod.view(r1 - r0, T, B2 - c0, T).sum(3).sum(1) if T != 1 else prod
            K[r0:r1, c0:] += block
    return K if cross else mirror_upper(K)


def _per_sample_grads(A, E, g, lo, hi):
    """(B, (hi − lo)·k): rows vec(E_i[:, g, lo:hi]ᵀ A_i[:, g]) of per-sample gradients."""
    return torch.bmm(E[:, :, g, lo:hi].transpose(1, 2), A[:, :, g]).flatten(1)


def _per_sample(A, E, A2, E2, bias, cross, diagonal):
    """K = Σ_g G_g G2_gᵀ with G_i = E_iᵀ [A_i, 1] built per group in blocks of d_out rows."""
    B1, T, G, k = A.shape
    B2, d_out = A2.shape[0], E.shape[-1]
    K = A.new_zeros((B1,) if diagonal else (B1, B2))
    step = max(1, _GRAD_BLOCK // max(1, (B1 + B2) * k))
    for g in range(G):
        for lo in range(0, d_out, step):
            hi = min(lo + step, d_out)
            G1 = _per_sample_grads(A, E, g, lo, hi)
            G2 = _per_sample_grads(A2, E2, g, lo, hi) if cross else G1
            if diagonal:
                K += _row_dots(G1, G2)
            elif cross:
                K.addmm_(G1, G2.T)
            else:
                for r0, r1 in upper_row_blocks(B1):
                    K[r0:r1, r0:].addmm_(G1[r0:r1], G1[r0:].T)
        if bias:  # the bias column of G_i: Σ_t e_it
            S1 = E[:, :, g].sum(1)
            S2 = E2[:, :, g].sum(1) if cross else S1
            if diagonal:
                K += _row_dots(S1, S2)
            else:
                K.addmm_(S1, S2.T)
    return K if cross or diagonal else mirror_upper(K)


def gram_linear(A, E, bias=False, A2=None, E2=None, diagonal=False, route="token_pair",
                groups=1):
    """K_ij = ⟨g_i, h_j⟩ = Σ_{t,s} (a_it·a2_js + b)(e_it·e2_js) (see the module docstring; the
    arguments and the result as lowrank_kernels.reference.gram_linear). route: 'token_pair',
    'per_sample' or 'auto' (the cheaper by `choose_route`). float64 in gives float64 out,
    anything else float32 (fp32 accumulation)."""
    dtype = acc_dtype(A)
    cross = A2 is not None
    b = 1.0 if bias else 0.0
    if A.dim() == 2 and groups == 1 and not cross and route != "per_sample":  # T = 1 fast path
        A1, E1 = A.to(dtype), E.to(dtype)
        if diagonal:
            xa, xe = _row_dots(A1, A1), _row_dots(E1, E1)
            return xe.mul_(xa.add_(b)) if b else xe.mul_(xa)
        if route == "token_pair" or d_in_d_out_cheaper(A.shape[1], E.shape[1], bias):
            return _t1_symmetric(A1, E1, b)
    A1, E1 = as_tokens(A.to(dtype), groups), as_tokens(E.to(dtype), groups)
    A2_ = as_tokens(A2.to(dtype), groups) if cross else A1
    E2_ = as_tokens(E2.to(dtype), groups) if cross else E1
    B1, T, G, d_in = A1.shape
    if route == "auto":
        route = choose_route(B1, A2_.shape[0], T, d_in, E1.shape[-1], G, bias, cross, diagonal)
    if B1 == 0 or A2_.shape[0] == 0:
        return A1.new_zeros((B1,) if diagonal else (B1, A2_.shape[0]))
    if route == "token_pair":
        if diagonal:
            return _diagonal_token_pair(A1, E1, A2_, E2_, b)
        return _token_pair(A1, E1, A2_, E2_, b, cross)
    return _per_sample(A1, E1, A2_, E2_, bias, cross, diagonal)
