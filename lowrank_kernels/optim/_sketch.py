"""Kronecker sketch of a big layer's per-sample gradients, for SENG's Gram.

A linear layer's per-sample gradient is a product of two factors, g_i = E_iᵀ A_i (tokens T,
A_i T × d_in, E_i T × d_out). Sketching both sides with independent S_in (s × d_in), S_out
(s × d_out), E[SᵀS] = I (lowrank_kernels.sketch.kronecker_sketch),

    g̃_i = S_out g_i S_inᵀ = (E_i S_outᵀ)ᵀ (A_i S_inᵀ),   K̃_ij = ⟨g̃_i, g̃_j⟩,   E[K̃] = K

and K̃ is the Gram of a linear layer with s inputs and s outputs: the same op on thinner
factors. A 2-D convolution (groups = 1) sketches its channels the same way (same seeds:
S_in from `seed`, S_out from sketch.per_sample.output_side_seed(seed)): mixing input channels
commutes with taking patches, so g̃_i = S_out g_i (S_in ⊗ I_kh·kw)ᵀ is the per-sample gradient
of a convolution with s input and s output channels on the channel-sketched X and E.
s = min(sketch_size, side). Ω is Rademacher, generated from (seed, row, column) by
`sketch_matmul`, never stored. Other kinds (embeddings, materialized small parameters) stay
exact. Non-finite factors are zeroed before sketching (the sketch ops reject them) and
reported in the returned flag, so that the caller falls back instead of raising.
"""
import math

import torch

from .. import sketch_matmul
from ..capture import _kinds
from ..sketch import kronecker_sketch
from ..sketch.per_sample import output_side_seed
from . import _captured

DIST = "rademacher"


def _sketch(contribution, k, seed):
    if isinstance(contribution, _kinds.Linear):
        A, E = contribution.A, contribution.E
        A2, E2 = kronecker_sketch(A.to(E.dtype), E, min(k, A.shape[-1]), min(k, E.shape[-1]),
                                  seed=seed, dist=DIST)
        return _kinds.Linear(A2.to(E.dtype), E2.to(E.dtype), contribution.backend)
    if isinstance(contribution, _kinds.Conv2d) and contribution.geometry[4] == 1:
        X, E = contribution.X, contribution.E

        def channels(Y, s):
            flat = Y.permute(0, 2, 3, 1).reshape(-1, Y.shape[1])
            size = min(k, flat.shape[1])
            mixed = sketch_matmul(flat, size, s, DIST) / math.sqrt(size)
            return mixed.reshape(Y.shape[0], Y.shape[2], Y.shape[3], -1).permute(0, 3, 1, 2)

        return _kinds.Conv2d(channels(X, seed).to(E.dtype),
                             channels(E, output_side_seed(seed)).to(E.dtype),
                             contribution.geometry, contribution.backend)
    return contribution


def sketched_gram(contribution_list, k, seed):
    """(K̃, finite): the Gram of the Kronecker-sketched per-sample gradients (see above)."""
    finite = torch.ones((), dtype=torch.bool, device=_device(contribution_list[0]))
    clean = []
    for c in contribution_list:
        if isinstance(c, (_kinds.Linear, _kinds.Conv2d)):
            first = c.A if isinstance(c, _kinds.Linear) else c.X
            finite = finite & torch.isfinite(first).all() & torch.isfinite(c.E).all()
            if isinstance(c, _kinds.Linear):
                c = _kinds.Linear(torch.nan_to_num(c.A, 0.0, 0.0, 0.0),
                                  torch.nan_to_num(c.E, 0.0, 0.0, 0.0), c.backend)
            else:
                c = _kinds.Conv2d(torch.nan_to_num(c.X, 0.0, 0.0, 0.0),
                                  torch.nan_to_num(c.E, 0.0, 0.0, 0.0), c.geometry, c.backend)
        clean.append(_sketch(c, k, seed + 2 * len(clean)))
    return _captured.gram(clean), finite


def _device(c):
    return c.G.device if isinstance(c, _kinds.Dense) else c.E.device
