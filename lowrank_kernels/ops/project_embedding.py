"""lowrank_kernels::project_embedding — the projection of the per-sample gradients of an
nn.Embedding weight on V, (Uᵀ V)_i = ⟨g_i, V⟩ with g_i = Σ_t onehot(idx_it) e_itᵀ:

    (Uᵀ V)_i = Σ_t [idx_it ≠ padding_idx] e_it · V[idx_it],

V (num_embeddings, d) -> (B,); V (m, num_embeddings, d) -> (B, m).
Output float32 (float64 for float64 E on the reference backend).
"""
import torch

from .. import _checks
from .._registry import OpSpec, on_backend, register
from ..reference.project_embedding import project_embedding as reference_project_embedding
from ._common import (ALL_FLOAT, check_idx_E, check_index_range, check_num_embeddings,
                      layer_backends, normalized_padding, without_padding)

OP = "project_embedding"


def check(idx, E, V, padding_idx):
    check_idx_E(OP, "idx", idx, "E", E)
    if not (type(V) is torch.Tensor and V.dtype in ALL_FLOAT and V.device == E.device and
            2 <= V.dim() <= 3 and V.shape[-1] == E.shape[2]):  # else the error
        _checks.check_tensor(OP, "V", V, (2, 3), "num_embeddings x d or m x num_embeddings x d")
        _checks.check_float(OP, "V", V)
        _checks.check_same(OP, ("E", "V"), (E, V), "device")
        _checks.check_dim_match(OP, "E", E.shape[2], "V", V.shape[-1],
                                "embedding dim d (last dim)")
    check_num_embeddings(OP, V.shape[-2], padding_idx)
    return E


def fake(idx, E, V, padding_idx):
    dtype = torch.float64 if E.dtype == torch.float64 else torch.float32
    B = idx.shape[0]
    return E.new_empty((B,) if V.dim() == 2 else (B, V.shape[0]), dtype=dtype)


def _prepared(run, skips_padding=False):
    """Range-check, normalize padding_idx (and zero padding tokens' E for a backend that
    does not skip them), then run a backend."""
    def backend(idx, E, V, padding_idx):
        check_index_range(OP, "idx", idx, V.shape[-2])
        padding_idx = normalized_padding(padding_idx, V.shape[-2])
        if not skips_padding:
            E = without_padding(idx, E, padding_idx)
        return run(idx, E, V, padding_idx)
    return backend


def _triton(*args):
    from ..triton.project_embedding import project_embedding as triton_project_embedding

    return triton_project_embedding(*args)


SPEC = register(OpSpec(
    name=OP,
    schema="(Tensor idx, Tensor E, Tensor V, int? padding_idx=None) "
           "-> Tensor",
    check=check,
    fake=fake,
    **layer_backends(_prepared(reference_project_embedding), _prepared(_triton, skips_padding=True),
                     native_cpu=True),
    finite_inputs=("E", "V"),
))
_OP = torch.ops.lowrank_kernels.project_embedding.default


def project_embedding(idx: torch.Tensor, E: torch.Tensor, V: torch.Tensor,
                      padding_idx: int | None = None, *, backend: str | None = None):
    """Projection of the per-sample gradients of an nn.Embedding weight on V,
    (Uᵀ V)_i = Σ_t [idx_it ≠ padding_idx] e_it · V[idx_it].

    idx: (B, T) int64, E: (B, T, d), V: (num_embeddings, d) -> (B,) or
    (m, num_embeddings, d) -> (B, m). backend: None (the device's kernel), or force
    'reference' / 'triton' (see use_backend). Returns float32 (float64 for float64 E on the
    reference backend)."""
    return on_backend(_OP, backend)(idx, E, V, padding_idx)
