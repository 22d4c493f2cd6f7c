"""lowrank_kernels::gram_embedding — the per-sample-gradient Gram of an nn.Embedding weight:

    K_ij = ⟨g_i, g_j⟩ = Σ_{t,s} [idx_it = idx_js ≠ padding_idx] (e_it · e_js),

with g_i = Σ_t onehot(idx_it) e_itᵀ (num_embeddings × d) the per-sample gradient, idx (B, T)
the token indices and E (B, T, d) the gradients of the embedding outputs. The per-sample
gradients are never formed. With idx2/E2 (B2, T2[, d]): the cross-Gram Uᵀ V (B × B2);
diagonal=True: diag(K) (B), the per-sample squared gradient norms (with idx2/E2: the
diagonal of the cross-Gram, B2 = B). Output float32 (float64 for float64 E on the reference
backend). The checks here are shared by the embedding weighted sum and projection.
"""
import torch

from .. import _checks
from .._registry import OpSpec, on_backend, register
from ..reference.gram_embedding import gram_embedding as reference_gram_embedding
from ._common import (check_idx_E, check_index_range, check_num_embeddings, layer_backends,
                      normalized_padding, without_padding)

OP = "gram_embedding"


def check(idx, E, num_embeddings, padding_idx, idx2, E2, diagonal):
    check_idx_E(OP, "idx", idx, "E", E)
    check_num_embeddings(OP, num_embeddings, padding_idx)
    if (idx2 is None) != (E2 is None):
        raise ValueError(f"{OP}: idx2 and E2 must be given together (cross-Gram) or not at all")
    if idx2 is not None:
        check_idx_E(OP, "idx2", idx2, "E2", E2)
        _checks.check_same(OP, ("E", "E2"), (E, E2), "device")
        _checks.check_same(OP, ("E", "E2"), (E, E2), "dtype")
        _checks.check_dim_match(OP, "E", E.shape[2], "E2", E2.shape[2], "embedding dim d")
        if diagonal:
            _checks.check_dim_match(OP, "idx", idx.shape[0], "idx2", idx2.shape[0],
                                    "batch size B (diagonal of a cross-Gram)")
    return E


def fake(idx, E, num_embeddings, padding_idx, idx2, E2, diagonal):
    dtype = torch.float64 if E.dtype == torch.float64 else torch.float32
    B = idx.shape[0]
    shape = (B,) if diagonal else (B, B if idx2 is None else idx2.shape[0])
    return E.new_empty(shape, dtype=dtype)


def _prepared(run, skips_padding=False):
    """Range-check the indices and normalize padding_idx, then run a backend (one that does
    not skip padding tokens itself gets their E rows zeroed)."""
    def backend(idx, E, num_embeddings, padding_idx, idx2, E2, diagonal):
        check_index_range(OP, "idx", idx, num_embeddings)
        if idx2 is not None:
            check_index_range(OP, "idx2", idx2, num_embeddings)
        padding_idx = normalized_padding(padding_idx, num_embeddings)
        if not skips_padding:
            E = without_padding(idx, E, padding_idx)
            E2 = None if E2 is None else without_padding(idx2, E2, padding_idx)
        return run(idx, E, num_embeddings, padding_idx, idx2, E2, diagonal)
    return backend


def _triton(*args):
    from ..triton.gram_embedding import gram_embedding as triton_gram_embedding

    return triton_gram_embedding(*args)


SPEC = register(OpSpec(
    name=OP,
    schema="(Tensor idx, Tensor E, int num_embeddings, int? padding_idx=None, "
           "Tensor? idx2=None, Tensor? E2=None, bool diagonal=False) -> Tensor",
    check=check,
    fake=fake,
    **layer_backends(_prepared(reference_gram_embedding), _prepared(_triton, skips_padding=True),
                     native_cpu=True),
    finite_inputs=("E", "E2"),
))
_OP = torch.ops.lowrank_kernels.gram_embedding.default


def gram_embedding(idx: torch.Tensor, E: torch.Tensor, num_embeddings: int,
                   padding_idx: int | None = None, *, idx2: torch.Tensor | None = None,
                   E2: torch.Tensor | None = None, diagonal: bool = False,
                   backend: str | None = None):
    """Per-sample-gradient Gram of an nn.Embedding weight,
    K_ij = Σ_{t,s} [idx_it = idx_js ≠ padding_idx] (e_it · e_js).

    idx: (B, T) int64 token indices, E: (B, T, d) gradients of the embedding outputs.
    idx2/E2: a second batch (B2, T2[, d]) for the cross-Gram Uᵀ V (B × B2).
    diagonal: return diag(K) (B), the per-sample squared gradient norms.
    backend: None (the device's kernel), or force 'reference' / 'triton' (see use_backend).
    Returns float32 (float64 for float64 E on the reference backend)."""
    return on_backend(_OP, backend)(idx, E, num_embeddings, padding_idx, idx2, E2, diagonal)
