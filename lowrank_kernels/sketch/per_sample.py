"""Sketches of the per-sample gradients of a big linear layer, U = [g_1 … g_B] (D × B),
g_i = Σ_t e_it a_itᵀ (d_out × d_in, + the bias gradient Σ_t e_it), from the layer inputs A
(B, [T,] d_in) and output gradients E (B, [T,] d_out) — without forming U:

(a) project_per_sample_gradients: P = S U (s × B), S = Ωᵀ/√s a dense Gaussian/Rademacher
    s × D matrix generated in-kernel. E[SᵀS] = I  ⇒  E[PᵀP] = UᵀU = K (every entry unbiased).
(b) kronecker_sketch: Ã_i = A_i S_inᵀ, Ẽ_i = E_i S_outᵀ (S_in s_in × d_in, S_out s_out × d_out,
    independent, entries of variance 1/s). The sketched per-sample gradient Ẽ_iᵀÃ_i =
    S_out g_i S_inᵀ, and K̃_ij = Σ_{t,s} (Ã_iÃ_jᵀ)_{ts} (Ẽ_iẼ_jᵀ)_{ts}; since E[S_inᵀS_in] = I,
    E[S_outᵀS_out] = I and the two are independent, E[K̃] = K (every entry, diagonal included).
(c) token_subsample: per sample, s of the T tokens uniformly without replacement, rescaled by
    T/s (as in SENG): ĝ_i = (T/s) Σ_{t∈S_i} e_it a_itᵀ is unbiased for g_i, and K̃_ij =
    ⟨ĝ_i, ĝ_j⟩ is unbiased for K_ij when i ≠ j (independent subsets); the diagonal is biased
    upwards by tr Cov(ĝ_i) (zero at s = T).

All use Ω_ij = f(seed, i, j) (lowrank_kernels.sketch_omega): reproducible across calls,
devices and backends for a fixed seed.
"""
import math

import torch

from .. import _checks
from ..ops.gram_linear import gram_linear
from ..ops.sketch_matmul import sketch_matmul
from ..ops.sketch_omega import DISTS, sketch_omega

# The output side of the Kronecker sketch uses an independent Philox key.
_OUTPUT_SEED_SHIFT = 0x5851F42D4C957F2D


def output_side_seed(seed: int) -> int:
    """Seed of S_out in kronecker_sketch: (seed + 0x5851F42D4C957F2D) mod 2⁶³."""
    return (seed + _OUTPUT_SEED_SHIFT) % 2 ** 63


def _check_layer(op, A, E, s, seed, dist=None, name_s="s"):
    _checks.check_tensor(op, "A", A, (2, 3), "B x d_in or B x T x d_in: layer inputs")
    _checks.check_tensor(op, "E", E, (2, 3), "B x d_out or B x T x d_out: output gradients")
    _checks.check_float(op, "A", A)
    _checks.check_float(op, "E", E)
    _checks.check_same(op, ("A", "E"), (A, E), "device")
    _checks.check_same(op, ("A", "E"), (A, E), "dtype")
    if A.dim() != E.dim():
        raise ValueError(f"{op}: A and E must both be 2-D or both 3-D, got {A.dim()}-D and "
                         f"{E.dim()}-D")
    _checks.check_dim_match(op, "A", A.shape[:-1], "E", E.shape[:-1],
                            "leading dims (B[, T])")
    for name, value in ((name_s, s),) if not isinstance(name_s, tuple) else zip(name_s, s):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{op}: {name} must be a positive int, got {value!r}")
    if not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"{op}: seed must be an int in [0, 2**63), got {seed!r}")
    if dist is not None and dist not in DISTS:
        raise ValueError(f"{op}: dist must be 'gaussian' or 'rademacher', got {dist!r}")


def _tokens(X):
    return X if X.dim() == 3 else X.unsqueeze(1)


def project_per_sample_gradients(A, E, s: int, *, bias: bool = False, seed: int = 0,
                                 dist: str = "gaussian", block_elements: int = 1 << 24,
                                 backend: str | None = None) -> torch.Tensor:
    """P = S U (s × B): a random projection of the per-sample gradients, S_rd = Ω_dr/√s with
    Ω_dr = f(seed, d, r) and d the row-major index of g_i: d = o·d_in + p for the weight
    gradient (d_out × d_in), d = d_out·d_in + o for the bias gradient (bias=True).
    E[SᵀS] = I, so E[PᵀP] = UᵀU (K̃ = PᵀP is an unbiased Gram, Var K̃_ij = (K_iiK_jj + K_ij²)/s
    for Gaussian S).

    U is never formed: the gradients of a block of output rows o (≤ block_elements entries
    over the batch) are built from A and E (one batched GEMM over tokens) and multiplied by
    the matching rows of Ω, generated in-kernel by lowrank_kernels.sketch_matmul with
    row_offset = o₀·d_in. Returns float32 (float64 for float64 inputs)."""
    op = "project_per_sample_gradients"
    _check_layer(op, A, E, s, seed, dist)
    dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    A, E = _tokens(A).to(dtype), _tokens(E).to(dtype)
    B, _, d_in = A.shape
    d_out = E.shape[2]
    Pt = torch.zeros((B, s), dtype=dtype, device=A.device)  # (S U)ᵀ
    rows = max(1, block_elements // max(1, B * d_in))
    for o0 in range(0, d_out, rows):
        o1 = min(d_out, o0 + rows)
        G = torch.einsum("bto,btp->bop", E[:, :, o0:o1], A).reshape(B, -1)  # B × (o1−o0)·d_in
        Pt += sketch_matmul(G, s, seed, dist, row_offset=o0 * d_in, backend=backend)
    if bias:
        Pt += sketch_matmul(E.sum(1), s, seed, dist, row_offset=d_out * d_in, backend=backend)
    return Pt.T / math.sqrt(s)


def kronecker_sketch(A, E, s_in: int, s_out: int, *, seed: int = 0, dist: str = "gaussian",
                     backend: str | None = None):
    """(Ã, Ẽ) = (A S_inᵀ, E S_outᵀ): the layer factors sketched on their feature dimension,
    S_in = Ω_inᵀ/√s_in (Ω_in: d_in × s_in, seed), S_out = Ω_outᵀ/√s_out (Ω_out: d_out × s_out,
    seed output_side_seed(seed)). Shapes (B, [T,] s_in) and (B, [T,] s_out). The per-sample
    gradient of the sketched layer is Ẽ_iᵀÃ_i = S_out g_i S_inᵀ (s_out × s_in); its Gram
    (kronecker_sketch_gram) is unbiased for K. Ω is generated in-kernel (sketch_matmul).
    Returns float32 (float64 for float64 inputs)."""
    op = "kronecker_sketch"
    _check_layer(op, A, E, (s_in, s_out), seed, dist, name_s=("s_in", "s_out"))
    A_sk = sketch_matmul(A.reshape(-1, A.shape[-1]), s_in, seed, dist, backend=backend)
    E_sk = sketch_matmul(E.reshape(-1, E.shape[-1]), s_out, output_side_seed(seed), dist,
                         backend=backend)
    return (A_sk.reshape(*A.shape[:-1], s_in) / math.sqrt(s_in),
            E_sk.reshape(*E.shape[:-1], s_out) / math.sqrt(s_out))


def kronecker_sketch_gram(A, E, s_in: int, s_out: int, *, bias: bool = False, seed: int = 0,
                          dist: str = "gaussian", backend: str | None = None) -> torch.Tensor:
    """K̃_ij = Σ_{t,s} (Ã_iÃ_jᵀ + b)_{ts} (Ẽ_iẼ_jᵀ)_{ts} with (Ã, Ẽ) = kronecker_sketch(A, E,
    ...) (b = 1 with bias): E[K̃] = K, the per-sample-gradient Gram of the layer, every entry.
    Computed by lowrank_kernels.gram_linear on the sketched factors (B × B)."""
    A_sk, E_sk = kronecker_sketch(A, E, s_in, s_out, seed=seed, dist=dist, backend=backend)
    return gram_linear(A_sk, E_sk, bias)


def token_subsample(A, E, s: int, *, seed: int = 0):
    """(A_sub, E_sub), both (B, s, ·): per sample i, the s tokens with the smallest keys
    Ω_{i,4t} (the sketch matrix, Gaussian: i.i.d. continuous keys, so the subset is uniform
    without replacement, independent across samples; ties, of probability < T²/2²⁴, go to the
    lower t), with E_sub
    scaled by T/s, so that the per-sample gradient of (A_sub, E_sub) is
    ĝ_i = (T/s) Σ_{t∈S_i} e_it a_itᵀ (and the bias gradient (T/s) Σ_{t∈S_i} e_it): E[ĝ_i] = g_i.
    A, E: (B, T, ·) with 1 ≤ s ≤ T."""
    op = "token_subsample"
    _check_layer(op, A, E, s, seed)
    if A.dim() != 3:
        raise ValueError(f"{op}: A and E must be 3-D (B x T x d) to subsample tokens")
    B, T, _ = A.shape
    if s > T:
        raise ValueError(f"{op}: s must be <= T = {T}, got {s}")
    keys = sketch_omega(torch.arange(B, device=A.device), 4 * T, seed)[:, ::4]  # B × T, i.i.d.
    idx = torch.sort(keys, dim=1, stable=True).indices[:, :s]
    A_sub = torch.gather(A, 1, idx[:, :, None].expand(B, s, A.shape[2]))
    E_sub = torch.gather(E, 1, idx[:, :, None].expand(B, s, E.shape[2])) * (T / s)
    return A_sub, E_sub


def token_subsample_gram(A, E, s: int, *, bias: bool = False, seed: int = 0) -> torch.Tensor:
    """K̃_ij = ⟨ĝ_i, ĝ_j⟩ with ĝ from token_subsample (SENG's token sketch), by
    lowrank_kernels.gram_linear on the subsampled tokens. Unbiased for K_ij when i ≠ j;
    E[K̃_ii] = K_ii + tr Cov(ĝ_i) ≥ K_ii (equal at s = T)."""
    A_sub, E_sub = token_subsample(A, E, s, seed=seed)
    return gram_linear(A_sub, E_sub, bias)
