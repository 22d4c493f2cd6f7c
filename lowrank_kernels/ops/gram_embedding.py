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
from .._registry import Backend, OpSpec, register
from ..reference.gram_embedding import gram_embedding as reference_gram_embedding

OP = "gram_embedding"
ALL_FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The interpreter computes bf16 wrongly (DESIGN §4): bf16 Triton is GPU-only; the kernels
# accumulate in fp32, so float64 goes to the reference.
TRITON_DTYPES = {"cpu": (torch.float32, torch.float16),
                 "cuda": (torch.float32, torch.float16, torch.bfloat16)}
AUTO = {"cpu": ("reference",), "cuda": ("triton", "reference")}


def check_idx_E(op, idx_name, idx, E_name, E):
    """idx (B, T) int64 and E (B, T, d) floating, on one device."""
    _checks.check_tensor(op, idx_name, idx, 2, "B x T: token indices")
    if idx.dtype != torch.int64:
        raise TypeError(f"{op}: {idx_name} must be an int64 tensor of indices, got {idx.dtype}")
    _checks.check_tensor(op, E_name, E, 3, "B x T x d: gradients of the embedding outputs")
    _checks.check_float(op, E_name, E)
    _checks.check_same(op, (idx_name, E_name), (idx, E), "device")
    if tuple(E.shape[:2]) != tuple(idx.shape):
        raise ValueError(f"{op}: {idx_name} and {E_name} must have the same (B, T) leading "
                         f"dims, got {tuple(idx.shape)} and {tuple(E.shape)}")


def check_num_embeddings(op, num_embeddings, padding_idx):
    if num_embeddings < 1:
        raise ValueError(f"{op}: num_embeddings must be positive, got {num_embeddings}")
    if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"{op}: padding_idx must be in [-num_embeddings, num_embeddings) = "
                         f"[{-num_embeddings}, {num_embeddings}), got {padding_idx}")


def normalized_padding(padding_idx, num_embeddings):
    """padding_idx as nn.Embedding stores it (a negative one counts from the end)."""
    if padding_idx is None or padding_idx >= 0:
        return padding_idx
    return padding_idx + num_embeddings


def check_index_range(op, name, idx, num_embeddings):
    """Every index in [0, num_embeddings) (a device sync; run by the real kernels only)."""
    if idx.numel() and (bool(idx.min() < 0) or bool(idx.max() >= num_embeddings)):
        raise IndexError(f"{op}: {name} must hold indices in [0, {num_embeddings}), got values "
                         f"in [{int(idx.min())}, {int(idx.max())}]")


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


def _prepared(run):
    """Range-check the indices and normalize padding_idx, then run a backend."""
    def backend(idx, E, num_embeddings, padding_idx, idx2, E2, diagonal):
        check_index_range(OP, "idx", idx, num_embeddings)
        if idx2 is not None:
            check_index_range(OP, "idx2", idx2, num_embeddings)
        return run(idx, E, num_embeddings, normalized_padding(padding_idx, num_embeddings),
                   idx2, E2, diagonal)
    return backend


def _triton(*args):
    from ..triton.gram_embedding import gram_embedding as triton_gram_embedding

    return triton_gram_embedding(*args)


SPEC = register(OpSpec(
    name=OP,
    schema="(Tensor idx, Tensor E, int num_embeddings, int? padding_idx=None, *, "
           "Tensor? idx2=None, Tensor? E2=None, bool diagonal=False, str? backend=None) -> Tensor",
    check=check,
    fake=fake,
    backends={
        "reference": Backend(_prepared(reference_gram_embedding), {"cpu": ALL_FLOAT,
                                                                    "cuda": ALL_FLOAT}),
        "triton": Backend(_prepared(_triton), TRITON_DTYPES),
    },
    auto=AUTO,
    finite_inputs=("E", "E2"),
    doc="K_ij = Σ_{t,s} [idx_it = idx_js ≠ pad] e_it·e_js",
))


def gram_embedding(idx: torch.Tensor, E: torch.Tensor, num_embeddings: int,
                   padding_idx: int | None = None, *, idx2: torch.Tensor | None = None,
                   E2: torch.Tensor | None = None, diagonal: bool = False,
                   backend: str | None = None):
    """Per-sample-gradient Gram of an nn.Embedding weight,
    K_ij = Σ_{t,s} [idx_it = idx_js ≠ padding_idx] (e_it · e_js).

    idx: (B, T) int64 token indices, E: (B, T, d) gradients of the embedding outputs.
    idx2/E2: a second batch (B2, T2[, d]) for the cross-Gram Uᵀ V (B × B2).
    diagonal: return diag(K) (B), the per-sample squared gradient norms.
    backend: 'auto' (default, or $LOWRANK_BACKEND), 'reference' or 'triton'.
    Returns float32 (float64 for float64 E on the reference backend)."""
    return torch.ops.lowrank_kernels.gram_embedding(
        idx, E, num_embeddings, padding_idx, idx2=idx2, E2=E2, diagonal=diagonal,
        backend=backend)
