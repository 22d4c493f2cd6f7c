"""lowrank_kernels::weighted_sum_embedding — the weighted sum of the per-sample gradients of an
nn.Embedding weight, U c = Σ_i c_i g_i with g_i = Σ_t onehot(idx_it) e_itᵀ:

    (U c)[r] = Σ_{i,t: idx_it = r ≠ padding_idx} c_i e_it      (a scatter-add),

c (B,) -> (num_embeddings, d); c (B, m) -> (m, num_embeddings, d) (U C, m directions).
Output float32 (float64 for float64 E on the reference backend).
"""
import torch

from .. import _checks
from .._registry import OpSpec, on_backend, register
from ..reference.weighted_sum_embedding import (
    weighted_sum_embedding as reference_weighted_sum_embedding)
from ._common import (ALL_FLOAT, check_idx_E, check_index_range, check_num_embeddings,
                      layer_backends, normalized_padding, without_padding)

OP = "weighted_sum_embedding"


def check(idx, E, c, num_embeddings, padding_idx):
    if type(idx) is torch.Tensor and type(E) is torch.Tensor and type(c) is torch.Tensor and \
            idx.dtype is torch.int64 and E.dtype in ALL_FLOAT and c.dtype in ALL_FLOAT:
        device, i, e = E.device, idx.shape, E.shape
        if idx.device == device and c.device == device and len(i) == 2 and len(e) == 3 and \
                i[0] == e[0] and i[1] == e[1] and 1 <= c.dim() <= 2 and c.shape[0] == i[0] and \
                num_embeddings >= 1 and (padding_idx is None or
                                         -num_embeddings <= padding_idx < num_embeddings):
            return E  # the common case in one expression; errors come from the checks below
    check_idx_E(OP, "idx", idx, "E", E)
    if not (type(c) is torch.Tensor and c.dtype in ALL_FLOAT and c.device == E.device and
            1 <= c.dim() <= 2 and c.shape[0] == idx.shape[0]):  # else the error
        _checks.check_tensor(OP, "c", c, (1, 2), "B or B x m: sample weights")
        _checks.check_float(OP, "c", c)
        _checks.check_same(OP, ("E", "c"), (E, c), "device")
        _checks.check_dim_match(OP, "idx", idx.shape[0], "c", c.shape[0], "batch size B (dim 0)")
    check_num_embeddings(OP, num_embeddings, padding_idx)
    return E


def fake(idx, E, c, num_embeddings, padding_idx):
    dtype = torch.float64 if E.dtype == torch.float64 else torch.float32
    shape = (num_embeddings, E.shape[2])
    return E.new_empty(shape if c.dim() == 1 else (c.shape[1], *shape), dtype=dtype)


def _prepared(run, skips_padding=False):
    """Range-check, normalize padding_idx (and zero padding tokens' E for a backend that
    does not skip them), then run a backend."""
    def backend(idx, E, c, num_embeddings, padding_idx):
        check_index_range(OP, "idx", idx, num_embeddings)
        padding_idx = normalized_padding(padding_idx, num_embeddings)
        if not skips_padding:
            E = without_padding(idx, E, padding_idx)
        return run(idx, E, c, num_embeddings, padding_idx)
    return backend


def _triton(*args):
    from ..triton.weighted_sum_embedding import (
        weighted_sum_embedding as triton_weighted_sum_embedding)

    return triton_weighted_sum_embedding(*args)


SPEC = register(OpSpec(
    name=OP,
    schema="(Tensor idx, Tensor E, Tensor c, int num_embeddings, int? padding_idx=None) "
           "-> Tensor",
    check=check,
    fake=fake,
    **layer_backends(_prepared(reference_weighted_sum_embedding), _prepared(_triton, skips_padding=True),
                     native_cpu=True),
    finite_inputs=("E", "c"),
))
_OP = torch.ops.lowrank_kernels.weighted_sum_embedding.default


def weighted_sum_embedding(idx: torch.Tensor, E: torch.Tensor, c: torch.Tensor,
                           num_embeddings: int, padding_idx: int | None = None, *,
                           backend: str | None = None):
    """Weighted sum of the per-sample gradients of an nn.Embedding weight,
    (U c)[r] = Σ_{i,t: idx_it = r ≠ padding_idx} c_i e_it.

    idx: (B, T) int64, E: (B, T, d), c: (B,) -> (num_embeddings, d) or (B, m) ->
    (m, num_embeddings, d). backend: None (the device's kernel), or force 'reference' /
    'triton' (see use_backend). Returns float32 (float64 for float64 E on the reference
    backend)."""
    return on_backend(_OP, backend)(idx, E, c, num_embeddings, padding_idx)
