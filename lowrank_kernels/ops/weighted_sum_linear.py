"""lowrank_kernels::weighted_sum_linear — the weighted sum of the per-sample gradients of a
linear layer over T tokens:

    U c = Σ_i c_i g_i = (c ⊙ E)ᵀ A   over all (i, t) rows,   g_i = Σ_t e_it a_itᵀ,

one GEMM with the row scaling fused (the FNGD / SENG direction). With bias the bias part
Σ_{i,t} c_i e_it as well. c (B,) gives the weight-shaped (d_out, d_in) and (d_out,); a matrix
C (B, m) gives m of them, (m, d_out, d_in) and (m, d_out). Output float32 (float64 for
float64 inputs on the reference backend); c may have its own floating dtype.
"""
import torch

from .. import _checks
from .._registry import OpSpec, register
from ..reference.weighted_sum_linear import weighted_sum_linear as reference_weighted_sum
from .gram_linear import check_linear_layer, reference_and_triton

OP = "weighted_sum_linear"


def check_coefficients(op, c, lead):
    """c (B,) or (B, m): floating, on lead's device, one coefficient per sample."""
    _checks.check_tensor(op, "c", c, (1, 2), "B or B x m: the coefficients, one row a sample")
    _checks.check_float(op, "c", c)
    _checks.check_same(op, ("c", "the layer tensors"), (c, lead), "device")
    _checks.check_dim_match(op, "c", c.shape[0], "E", lead.shape[0], "batch size B (dim 0)")


def check(A, E, c, bias):
    check_linear_layer(OP, A, E)
    check_coefficients(OP, c, E)
    return A


def fake_outputs(lead, c, weight_shape, n_out, bias):
    """The (weight part, bias part) pair; the bias part is empty (0,) without bias."""
    dtype = torch.float64 if lead.dtype == torch.float64 else torch.float32
    stack = tuple(c.shape[1:])
    bias_shape = stack + (n_out,) if bias else (0,)
    return (lead.new_empty(stack + tuple(weight_shape), dtype=dtype),
            lead.new_empty(bias_shape, dtype=dtype))


def as_outputs(W, b):
    """Backend results to the op's pair: an empty (0,) bias part where there is none."""
    return W, (b if b is not None else W.new_empty((0,)))


def fake(A, E, c, bias):
    return fake_outputs(A, c, (E.shape[-1], A.shape[-1]), E.shape[-1], bias)


def _reference(A, E, c, bias):
    return as_outputs(*reference_weighted_sum(A, E, c, bias))


def _triton(A, E, c, bias):
    from ..triton.weighted_sum_linear import weighted_sum_linear as triton_weighted_sum

    return as_outputs(*triton_weighted_sum(A, E, c, bias))


SPEC = register(OpSpec(
    name=OP,
    schema="(Tensor A, Tensor E, Tensor c, bool bias=False, str? backend=None) "
           "-> (Tensor, Tensor)",
    check=check,
    fake=fake,
    **reference_and_triton(_reference, _triton),
    finite_inputs=("A", "E", "c"),
    doc="U c = (c ⊙ E)ᵀ A",
))


def weighted_sum_linear(A: torch.Tensor, E: torch.Tensor, c: torch.Tensor, bias: bool = False,
                        *, backend: str | None = None):
    """Weighted sum of a linear layer's per-sample gradients, U c = Σ_i c_i Σ_t e_it a_itᵀ
    = (c ⊙ E)ᵀ A (and the bias part Σ_{i,t} c_i e_it with bias).

    A: (B, d_in) or (B, T, d_in) layer inputs, E: (B, d_out) or (B, T, d_out) output gradients;
    c: (B,) -> ((d_out, d_in), (d_out,)); c: (B, m) -> ((m, d_out, d_in), (m, d_out)).
    backend: 'auto' (default, or $LOWRANK_BACKEND), 'reference' or 'triton'.
    Returns (grad_weight, grad_bias or None), float32 (float64 for float64 inputs)."""
    W, b = torch.ops.lowrank_kernels.weighted_sum_linear(A, E, c, bias, backend)
    return W, (b if bias else None)
