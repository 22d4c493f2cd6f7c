"""Kronecker sketch of a big layer's per-sample gradients, for SENG's Gram.

A linear layer's per-sample gradient is a product of two factors, g_i = E_iᵀ A_i (tokens T,
A_i T × d_in, E_i T × d_out). Sketching both sides with independent Ω_a (d_in × k), Ω_e
(d_out × k), scaled so that E[Ω Ωᵀ] = I,

    g̃_i = Ω_eᵀ g_i Ω_a = (E_i Ω_e)ᵀ (A_i Ω_a),    K̃_ij = ⟨g̃_i, g̃_j⟩,   E[K̃] = K

and K̃ is the Gram of a linear layer with k inputs and k outputs: the same op on thinner
factors (2B²T²·2k flops on the token-pair route instead of 2B²T²(d_in + d_out)). A 2-D
convolution (groups = 1) sketches its channels: mixing input channels commutes with taking
patches, so g̃_i = Ω_eᵀ g_i (Ω_a ⊗ I_kh·kw) is the per-sample gradient of a convolution with
k input and k output channels on X Ω_a and E Ω_e (channel-wise). Ω is generated from
(seed, row, column) by `sketch_matmul` (Rademacher ±1, scaled by 1/√k), never stored.
Other kinds (embeddings, materialized small parameters) and sides narrower than k are kept
exact. Non-finite factors are zeroed before sketching (the op rejects them) and reported in
the returned flag, so that the caller falls back instead of raising.
"""
import math

import torch

from .. import sketch_matmul
from ..capture import _kinds
from . import _captured


def _mix(M, k, seed):
    """M (n, d) -> M Ω / √k (n, k), or M itself when d <= k."""
    if M.shape[1] <= k:
        return M
    return sketch_matmul(M, k, seed, "rademacher") / math.sqrt(k)


def _sketch(contribution, k, seed):
    if isinstance(contribution, _kinds.Linear):
        A, E = contribution.A, contribution.E
        A2 = _mix(A.reshape(-1, A.shape[-1]), k, seed).reshape(*A.shape[:-1], -1)
        E2 = _mix(E.reshape(-1, E.shape[-1]), k, seed + 1).reshape(*E.shape[:-1], -1)
        return _kinds.Linear(A2.to(E.dtype), E2.to(E.dtype), contribution.backend)
    if isinstance(contribution, _kinds.Conv2d) and contribution.geometry[4] == 1:
        X, E = contribution.X, contribution.E

        def channels(Y, s):
            flat = Y.permute(0, 2, 3, 1).reshape(-1, Y.shape[1])
            mixed = _mix(flat, k, s)
            return mixed.reshape(Y.shape[0], Y.shape[2], Y.shape[3], -1).permute(0, 3, 1, 2)

        return _kinds.Conv2d(channels(X, seed).to(E.dtype), channels(E, seed + 1).to(E.dtype),
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
