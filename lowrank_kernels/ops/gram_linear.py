"""lowrank_kernels::gram_linear — the per-sample-gradient Gram of a linear layer over T tokens:

    K_ij = ⟨g_i, g_j⟩ = Σ_{t,s} (a_it·a_js + b)(e_it·e_js),   g_i = Σ_t e_it ã_itᵀ,

(T = 1: K = (A Aᵀ + b) ⊙ (E Eᵀ)), ã = [a, 1] and b = 1 with bias=True, A (B, d_in) or
(B, T, d_in) the layer inputs, E (B[, T], d_out) the gradients of its outputs. With A2/E2 the
cross-Gram K_ij = ⟨g_i, h_j⟩ (B × B2); diagonal=True returns the B vector diag(K) (per-sample
squared gradient norms; with A2/E2 of the same B: ⟨g_i, h_i⟩). Output float32 (float64 for
float64 inputs on the reference backend); for the symmetric K only the tiles on and above the
diagonal are computed, the rest mirrored.

route: "token_pair" (2·B²·T²·(d_in + d_out) flops: X = (A Aᵀ + b) ⊙ (E Eᵀ) per sample pair),
"per_sample" (per-sample gradients built in a bounded workspace, then their Gram:
2·B·T·d_in·d_out + 2·B²·d_in·d_out flops), or "auto": the cheaper by `choose_route` (GPU and
reference; the C++ CPU kernel, csrc/gram_linear.cpp, by its own cost model fitted to a CPU).
"""
import torch

from .._registry import OpSpec, on_backend, register
from ..reference.gram_linear import gram_linear as reference_gram_linear
from ._common import check_cross, check_linear_layer, check_route, choose_route, layer_backends

OP = "gram_linear"


def check(A, E, bias, A2, E2, diagonal, route):
    check_linear_layer(OP, A, E)
    if A2 is not None or E2 is not None:
        check_cross(OP, ("A2", "E2"), (A, E), (A2, E2), diagonal)
    check_route(OP, route)
    return A


def _out_shape(A, A2, diagonal):
    return (A.shape[0],) if diagonal else (A.shape[0], (A2 if A2 is not None else A).shape[0])


def fake(A, E, bias, A2, E2, diagonal, route):
    dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    return A.new_empty(_out_shape(A, A2, diagonal), dtype=dtype)


def resolve_route(A, E, bias, A2, diagonal, route):
    if route != "auto":
        return route
    T = A.shape[1] if A.dim() == 3 else 1
    B2 = A2.shape[0] if A2 is not None else A.shape[0]
    return choose_route(A.shape[0], B2, T, A.shape[-1], E.shape[-1], 1, bias, A2 is not None,
                        diagonal)


def _reference(A, E, bias, A2, E2, diagonal, route):
    return reference_gram_linear(A, E, bias, A2, E2, diagonal,
                                 resolve_route(A, E, bias, A2, diagonal, route))


def _triton(A, E, bias, A2, E2, diagonal, route):
    from ..triton.gram_linear import gram_linear as triton_gram_linear

    return triton_gram_linear(A, E, bias, A2, E2, diagonal,
                              resolve_route(A, E, bias, A2, diagonal, route))


SPEC = register(OpSpec(
    name=OP,
    schema="(Tensor A, Tensor E, bool bias=False, Tensor? A2=None, Tensor? E2=None, "
           "bool diagonal=False, str route=\"auto\") -> Tensor",
    check=check,
    fake=fake,
    **layer_backends(_reference, _triton, native_cpu=True),  # CPU: csrc/gram_linear.cpp
    finite_inputs=("A", "E", "A2", "E2"),
))
_OP = torch.ops.lowrank_kernels.gram_linear.default


def gram_linear(A: torch.Tensor, E: torch.Tensor, bias: bool = False, *, A2=None, E2=None,
                diagonal: bool = False, route: str = "auto", backend: str | None = None):
    """Per-sample-gradient Gram of a linear layer, K_ij = Σ_{t,s} (a_it·a_js + b)(e_it·e_js)
    (T = 1: K = (A Aᵀ + b) ⊙ (E Eᵀ); b = 1 with bias).

    A: (B, d_in) or (B, T, d_in) layer inputs, E: (B, d_out) or (B, T, d_out) output gradients
    (same dtype and device). A2/E2: a second batch, for the cross-Gram (B × B2).
    diagonal: return diag(K) (B), the per-sample squared gradient norms (with A2/E2 of the
    same batch size: ⟨g_i, h_i⟩).
    route: 'auto' (default), 'token_pair' or 'per_sample' (see the module docstring).
    backend: None (the device's kernel), or force 'reference' / 'triton' (see use_backend).
    Returns float32 (float64 for float64 inputs)."""
    return on_backend(_OP, backend)(A, E, bias, A2, E2, diagonal, route)
