"""lowrank_kernels::weighted_sum_linear — the weighted sum of the per-sample gradients of a
linear layer over T tokens:

    U c = Σ_i c_i g_i = (c ⊙ E)ᵀ A   over all (i, t) rows,   g_i = Σ_t e_it a_itᵀ,

one GEMM with the row scaling fused (the FNGD / SENG direction). With bias the bias part
Σ_{i,t} c_i e_it as well. c (B,) gives the weight-shaped (d_out, d_in) and (d_out,); a matrix
C (B, m) gives m of them, (m, d_out, d_in) and (m, d_out). Output float32 (float64 for
float64 inputs on the reference backend); c may have its own floating dtype.
"""
import torch

from .._registry import OpSpec, on_backend, register
from ..reference.weighted_sum_linear import weighted_sum_linear as reference_weighted_sum
from ._common import (check_coefficients, check_linear_layer, fake_outputs,
                      layer_backends)

OP = "weighted_sum_linear"




def check(A, E, c, bias):
    check_linear_layer(OP, A, E)
    check_coefficients(OP, c, E)
    return A






def fake(A, E, c, bias):
    return fake_outputs(A, c, (E.shape[-1], A.shape[-1]), E.shape[-1], bias)


def _reference(A, E, c, bias):
    return tuple(reference_weighted_sum(A, E, c, bias))


def _triton(A, E, c, bias):
    from ..triton.weighted_sum_linear import weighted_sum_linear as triton_weighted_sum

    return tuple(triton_weighted_sum(A, E, c, bias))


SPEC = register(OpSpec(
    name=OP,
    schema="(Tensor A, Tensor E, Tensor c, bool bias=False) "
           "-> (Tensor, Tensor?)",
    check=check,
    fake=fake,
    **layer_backends(_reference, _triton, native_cpu=True),
    finite_inputs=("A", "E", "c"),
))
_OP = torch.ops.lowrank_kernels.weighted_sum_linear.default


def weighted_sum_linear(A: torch.Tensor, E: torch.Tensor, c: torch.Tensor, bias: bool = False,
                        *, backend: str | None = None):
    """Weighted sum of a linear layer's per-sample gradients, U c = Σ_i c_i Σ_t e_it a_itᵀ
    = (c ⊙ E)ᵀ A (and the bias part Σ_{i,t} c_i e_it with bias).

    A: (B, d_in) or (B, T, d_in) layer inputs, E: (B, d_out) or (B, T, d_out) output gradients;
    c: (B,) -> ((d_out, d_in), (d_out,)); c: (B, m) -> ((m, d_out, d_in), (m, d_out)).
    backend: None (the device's kernel), or force 'reference' / 'triton' (see use_backend).
    Returns (grad_weight, grad_bias or None), float32 (float64 for float64 inputs)."""
    return on_backend(_OP, backend)(A, E, c, bias)
