"""lowrank_kernels::project_linear — the per-sample projections of a linear layer over T tokens:

    (Uᵀ V)_i = ⟨g_i, V⟩ = Σ_t e_itᵀ V a_it  (+ Σ_t e_it·v_b with V_bias),   g_i = Σ_t e_it a_itᵀ,

for one weight-shaped direction V (d_out, d_in) -> (B,), or m of them V (m, d_out, d_in)
-> (B, m) (V_bias (d_out,) or (m, d_out): the bias part of each direction). Used by the Woodbury
solve with a general right-hand side. Output float32 (float64 for float64 inputs on the
reference backend); V may have its own floating dtype.
"""
import torch

from .._registry import OpSpec, on_backend, register
from ..reference.project_linear import project_linear as reference_project
from ._common import check_directions, check_linear_layer, fake_projection, layer_backends

OP = "project_linear"




def check(A, E, V, V_bias):
    d_in, d_out = check_linear_layer(OP, A, E)
    check_directions(OP, V, V_bias, (d_out, d_in), E)
    return A




def fake(A, E, V, V_bias):
    return fake_projection(A, V, 2)


def _triton(A, E, V, V_bias):
    from ..triton.project_linear import project_linear as triton_project

    return triton_project(A, E, V, V_bias)


SPEC = register(OpSpec(
    name=OP,
    schema="(Tensor A, Tensor E, Tensor V, Tensor? V_bias=None) -> Tensor",
    check=check,
    fake=fake,
    **layer_backends(reference_project, _triton, native_cpu=True),
    finite_inputs=("A", "E", "V", "V_bias"),
))
_OP = torch.ops.lowrank_kernels.project_linear.default


def project_linear(A: torch.Tensor, E: torch.Tensor, V: torch.Tensor, V_bias=None, *,
                   backend: str | None = None):
    """Per-sample projections of a linear layer, (Uᵀ V)_i = ⟨g_i, V⟩ = Σ_t e_itᵀ V a_it
    (+ Σ_t e_it·V_bias).

    A: (B, d_in) or (B, T, d_in) layer inputs, E: (B, d_out) or (B, T, d_out) output gradients;
    V: (d_out, d_in) -> (B,), or (m, d_out, d_in) -> (B, m); V_bias: (d_out,) or (m, d_out).
    backend: None (the device's kernel), or force 'reference' / 'triton' (see use_backend).
    Returns float32 (float64 for float64 inputs)."""
    return on_backend(_OP, backend)(A, E, V, V_bias)
