"""lowrank_kernels::project_linear — the per-sample projections of a linear layer over T tokens:

    (Uᵀ V)_i = ⟨g_i, V⟩ = Σ_t e_itᵀ V a_it  (+ Σ_t e_it·v_b with V_bias),   g_i = Σ_t e_it a_itᵀ,

for one weight-shaped direction V (d_out, d_in) -> (B,), or m of them V (m, d_out, d_in)
-> (B, m) (V_bias (d_out,) or (m, d_out): the bias part of each direction). Used by the Woodbury
solve with a general right-hand side. Output float32 (float64 for float64 inputs on the
reference backend); V may have its own floating dtype.
"""
import torch

from .. import _checks
from .._registry import OpSpec, register
from ..reference.project_linear import project_linear as reference_project
from .gram_linear import check_linear_layer, reference_and_triton

OP = "project_linear"


def check_directions(op, V, V_bias, shape, lead):
    """V (shape) or (m, *shape), V_bias (shape[0],) or (m, shape[0]) — floating, on lead's
    device, one V_bias row per direction."""
    n = len(shape)
    _checks.check_tensor(op, "V", V, (n, n + 1), f"{' x '.join(map(str, shape))} or m x that: "
                                                 "weight-shaped directions")
    _checks.check_float(op, "V", V)
    _checks.check_same(op, ("V", "the layer tensors"), (V, lead), "device")
    if tuple(V.shape[-n:]) != tuple(shape):
        raise ValueError(f"{op}: V must have the weight's shape {tuple(shape)} in its last "
                         f"{n} dims, got {tuple(V.shape)}")
    if V_bias is None:
        return
    _checks.check_tensor(op, "V_bias", V_bias, V.dim() - n + 1, "the bias part of each direction")
    _checks.check_float(op, "V_bias", V_bias)
    _checks.check_same(op, ("V_bias", "V"), (V_bias, V), "device")
    expected = tuple(V.shape[:-n]) + (shape[0],)
    if tuple(V_bias.shape) != expected:
        raise ValueError(f"{op}: V_bias must have shape {expected} (one bias vector per "
                         f"direction of V), got {tuple(V_bias.shape)}")


def check(A, E, V, V_bias):
    check_linear_layer(OP, A, E)
    check_directions(OP, V, V_bias, (E.shape[-1], A.shape[-1]), E)
    return A


def fake_projection(lead, V, n):
    dtype = torch.float64 if lead.dtype == torch.float64 else torch.float32
    return lead.new_empty((lead.shape[0],) + tuple(V.shape[:-n]), dtype=dtype)


def fake(A, E, V, V_bias):
    return fake_projection(A, V, 2)


def _triton(A, E, V, V_bias):
    from ..triton.project_linear import project_linear as triton_project

    return triton_project(A, E, V, V_bias)


SPEC = register(OpSpec(
    name=OP,
    schema="(Tensor A, Tensor E, Tensor V, Tensor? V_bias=None, str? backend=None) -> Tensor",
    check=check,
    fake=fake,
    **reference_and_triton(reference_project, _triton),
    finite_inputs=("A", "E", "V", "V_bias"),
    doc="(Uᵀ V)_i = Σ_t e_itᵀ V a_it",
))


def project_linear(A: torch.Tensor, E: torch.Tensor, V: torch.Tensor, V_bias=None, *,
                   backend: str | None = None):
    """Per-sample projections of a linear layer, (Uᵀ V)_i = ⟨g_i, V⟩ = Σ_t e_itᵀ V a_it
    (+ Σ_t e_it·V_bias).

    A: (B, d_in) or (B, T, d_in) layer inputs, E: (B, d_out) or (B, T, d_out) output gradients;
    V: (d_out, d_in) -> (B,), or (m, d_out, d_in) -> (B, m); V_bias: (d_out,) or (m, d_out).
    backend: 'auto' (default, or $LOWRANK_BACKEND), 'reference' or 'triton'.
    Returns float32 (float64 for float64 inputs)."""
    return torch.ops.lowrank_kernels.project_linear(A, E, V, V_bias, backend)
