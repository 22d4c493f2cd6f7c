"""lowrank_kernels::project_embedding — the projection of the per-sample gradients of an
nn.Embedding weight on V, (Uᵀ V)_i = ⟨g_i, V⟩ with g_i = Σ_t onehot(idx_it) e_itᵀ:

    (Uᵀ V)_i = Σ_t [idx_it ≠ padding_idx] e_it · V[idx_it],

V (num_embeddings, d) -> (B,); V (m, num_embeddings, d) -> (B, m).
Output float32 (float64 for float64 E on the reference backend).
"""
import torch

from .. import _checks
from .._registry import Backend, OpSpec, register
from ..reference.project_embedding import project_embedding as reference_project_embedding
from .gram_embedding import (ALL_FLOAT, AUTO, TRITON_DTYPES, check_idx_E, check_index_range,
                             check_num_embeddings, normalized_padding)

OP = "project_embedding"


def check(idx, E, V, padding_idx):
    check_idx_E(OP, "idx", idx, "E", E)
    _checks.check_tensor(OP, "V", V, (2, 3), "num_embeddings x d or m x num_embeddings x d")
    _checks.check_float(OP, "V", V)
    _checks.check_same(OP, ("E", "V"), (E, V), "device")
    _checks.check_dim_match(OP, "E", E.shape[2], "V", V.shape[-1], "embedding dim d (last dim)")
    check_num_embeddings(OP, V.shape[-2], padding_idx)
    return E


def fake(idx, E, V, padding_idx):
    dtype = torch.float64 if E.dtype == torch.float64 else torch.float32
    B = idx.shape[0]
    return E.new_empty((B,) if V.dim() == 2 else (B, V.shape[0]), dtype=dtype)


def _prepared(run):
    def backend(idx, E, V, padding_idx):
        check_index_range(OP, "idx", idx, V.shape[-2])
        return run(idx, E, V, normalized_padding(padding_idx, V.shape[-2]))
    return backend


def _triton(*args):
    from ..triton.project_embedding import project_embedding as triton_project_embedding

    return triton_project_embedding(*args)


SPEC = register(OpSpec(
    name=OP,
    schema="(Tensor idx, Tensor E, Tensor V, int? padding_idx=None, *, str? backend=None) "
           "-> Tensor",
    check=check,
    fake=fake,
    backends={
        "reference": Backend(_prepared(reference_project_embedding),
                             {"cpu": ALL_FLOAT, "cuda": ALL_FLOAT}),
        "triton": Backend(_prepared(_triton), TRITON_DTYPES),
    },
    auto=AUTO,
    finite_inputs=("E", "V"),
    doc="(Uᵀ V)_i = Σ_t e_it · V[idx_it]",
))


def project_embedding(idx: torch.Tensor, E: torch.Tensor, V: torch.Tensor,
                      padding_idx: int | None = None, *, backend: str | None = None):
    """Projection of the per-sample gradients of an nn.Embedding weight on V,
    (Uᵀ V)_i = Σ_t [idx_it ≠ padding_idx] e_it · V[idx_it].

    idx: (B, T) int64, E: (B, T, d), V: (num_embeddings, d) -> (B,) or
    (m, num_embeddings, d) -> (B, m). backend: 'auto', 'reference' or 'triton'.
    Returns float32 (float64 for float64 E on the reference backend)."""
    return torch.ops.lowrank_kernels.project_embedding(idx, E, V, padding_idx, backend=backend)
