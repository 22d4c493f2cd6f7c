"""Kronecker sketch of a big layer's per-sample gradients, for SENG's Gram.

A linear layer's per-sample gradient is a product of two factors, g_i = E_iᵀ A_i (tokens T,
A_i T × d_in, E_i T × d_out). Sketching both sides with independent S_in (s × d_in), S_out
(s × d_out), E[SᵀS] = I (lowrank_kernels.sketch.kronecker_sketch),

    g̃_i = S_out g_i S_inᵀ = (E_i S_outᵀ)ᵀ (A_i S_inᵀ),   K̃_ij = ⟨g̃_i, g̃_j⟩,   E[K̃] = K

and K̃ is the Gram of a linear layer with s inputs and s outputs: the same op on thinner
factors. A 2-D convolution (groups = 1) sketches its channels the same way. Both come from
the public `Factors.sketch(s, seed)` (Rademacher Ω generated from (seed, row, column), never
stored); other kinds (embeddings, materialized small parameters) stay exact. Non-finite
factors give a non-finite Gram: the layer's solve then fails (info ≠ 0) and the caller falls
back, without a host sync.
"""
DIST = "rademacher"


def sketched_gram(factors, k, seed):
    """K̃ (B × B): the Gram of the Kronecker-sketched per-sample gradients (see above), with
    s = min(k, side) per side (non-finite where the factors are)."""
    return factors.sketch(k, seed, dist=DIST).gram()
