"""lowrank_kernels::subspace_project and ::subspace_expand — a stored basis P (D×k):

    subspace_project:  c = Pᵀ g          (k-vector, fp32; fp64 for fp64 inputs)
    subspace_expand:   w = base + P α    (D-vector in base's dtype, P's without base)

The two memory-bound halves of a subspace step (TWA: α moves with Pᵀ g, then w = P α is
written back; intrinsic dimension with a dense P: θ = θ₀ + P d and its gradient Pᵀ ∇θ).
Each reads P once. P may be any strided D×k view; the other inputs may have their own
floating dtype (fp32 accumulation), but float64 goes with float64 only. Autograd: the
gradient of subspace_expand is (Pᵀ ḡ, ḡ) for (α, base), of subspace_project P ḡ for g;
P is a constant basis (no gradient).
"""
import torch

from .. import _checks
from .._registry import Backend, OpSpec, on_backend, register
from ..reference.subspace_project import subspace_expand as reference_expand
from ..reference.subspace_project import subspace_project as reference_project

_ALL = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TRITON = {"cpu": (torch.float32, torch.float16),
           "cuda": (torch.float32, torch.float16, torch.bfloat16)}


def _check_float64_together(op, names, tensors):
    is64 = [t.dtype == torch.float64 for t in tensors]
    if any(is64) and not all(is64):
        listing = ", ".join(f"{n}: {t.dtype}" for n, t in zip(names, tensors))
        raise TypeError(f"{op}: float64 inputs must all be float64 ({listing})")


def _check_basis(op, P):
    _checks.check_tensor(op, "P", P, 2, "D x k: the basis, one column per direction")
    _checks.check_float(op, "P", P)
    if P.requires_grad:
        raise ValueError(f"{op}: P must not require grad (it is a constant basis)")


def check_project(P, g):
    if type(P) is torch.Tensor and type(g) is torch.Tensor and P.dtype in _ALL and \
            g.dtype in _ALL and (P.dtype is torch.float64) is (g.dtype is torch.float64) and \
            not P.requires_grad and P.device == g.device and P.dim() == 2 and g.dim() == 1 and \
            P.shape[0] == g.shape[0]:
        return P  # the common case in one expression; errors come from the checks below
    op = "subspace_project"
    _check_basis(op, P)
    _checks.check_tensor(op, "g", g, 1, "D: the vector to project")
    _checks.check_float(op, "g", g)
    _checks.check_same(op, ("P", "g"), (P, g), "device")
    _checks.check_dim_match(op, "P", P.shape[0], "g", g.shape[0], "length D (P dim 0)")
    _check_float64_together(op, ("P", "g"), (P, g))
    return P


def check_expand(P, alpha, base):
    if type(P) is torch.Tensor and type(alpha) is torch.Tensor and P.dtype in _ALL and \
            alpha.dtype in _ALL and not P.requires_grad and P.device == alpha.device and \
            P.dim() == 2 and alpha.dim() == 1 and P.shape[1] == alpha.shape[0]:
        f64 = P.dtype is torch.float64
        if base is None:
            if f64 is (alpha.dtype is torch.float64):
                return P  # the common cases in one expression; errors come from the checks below
        elif type(base) is torch.Tensor and base.dtype in _ALL and base.device == P.device and \
                base.dim() == 1 and base.shape[0] == P.shape[0] and \
                f64 is (alpha.dtype is torch.float64) is (base.dtype is torch.float64):
            return P
    op = "subspace_expand"
    _check_basis(op, P)
    _checks.check_tensor(op, "alpha", alpha, 1, "k: the coordinates")
    _checks.check_float(op, "alpha", alpha)
    _checks.check_dim_match(op, "P", P.shape[1], "alpha", alpha.shape[0], "k (P dim 1)")
    tensors, names = [P, alpha], ["P", "alpha"]
    if base is not None:
        _checks.check_tensor(op, "base", base, 1, "D: the point the subspace passes through")
        _checks.check_float(op, "base", base)
        _checks.check_dim_match(op, "P", P.shape[0], "base", base.shape[0], "length D (P dim 0)")
        tensors.append(base)
        names.append("base")
    _checks.check_same(op, tuple(names), tuple(tensors), "device")
    _check_float64_together(op, names, tensors)
    return P


def _out_dtype(*tensors):
    return torch.float64 if tensors[0].dtype == torch.float64 else torch.float32


def fake_project(P, g):
    return P.new_empty((P.shape[1],), dtype=_out_dtype(P, g))


def fake_expand(P, alpha, base):
    return P.new_empty((P.shape[0],), dtype=P.dtype if base is None else base.dtype)


def _triton_project(P, g):
    from ..triton.subspace_project import subspace_project

    return subspace_project(P, g)


def _triton_expand(P, alpha, base):
    from ..triton.subspace_project import subspace_expand

    return subspace_expand(P, alpha, base)


def _any_cpu_bf16(*tensors):  # on every call of the CUDA kernel: a plain loop, dtype first
    for t in tensors:
        if t is not None and t.dtype is torch.bfloat16 and t.is_cpu:
            return "bf16 Triton runs on GPU only (the interpreter computes bf16 wrongly)"
    return None


SPEC_PROJECT = register(OpSpec(
    name="subspace_project",
    schema="(Tensor P, Tensor g) -> Tensor",
    check=check_project,
    fake=fake_project,
    backends={
        "reference": Backend(reference_project, {"cpu": _ALL, "cuda": _ALL}),
        "triton": Backend(_triton_project, _TRITON, supports=_any_cpu_bf16),
        "native": Backend(None, {"cpu": _ALL}),  # csrc/subspace_project.cpp: the op itself
    },
    auto={"cpu": ("native",), "cuda": ("triton",)},
    finite_inputs=("P", "g"),
))
_PROJECT = torch.ops.lowrank_kernels.subspace_project.default

SPEC_EXPAND = register(OpSpec(
    name="subspace_expand",
    schema="(Tensor P, Tensor alpha, Tensor? base=None) -> Tensor",
    check=check_expand,
    fake=fake_expand,
    backends={
        "reference": Backend(reference_expand, {"cpu": _ALL, "cuda": _ALL}),
        "triton": Backend(_triton_expand, _TRITON, supports=_any_cpu_bf16),
        "native": Backend(None, {"cpu": _ALL}),  # csrc/subspace_project.cpp: the op itself
    },
    auto={"cpu": ("native",), "cuda": ("triton",)},
    finite_inputs=("P", "alpha", "base"),
))
_EXPAND = torch.ops.lowrank_kernels.subspace_expand.default


def _setup_project(ctx, inputs, output):
    P, g = inputs
    ctx.save_for_backward(P)
    ctx.g_dtype = g.dtype


def _backward_project(ctx, grad):
    P, = ctx.saved_tensors
    grad_g = _EXPAND(P, grad.to(P.dtype), None)
    return None, grad_g.to(ctx.g_dtype)


def _setup_expand(ctx, inputs, output):
    P, alpha, base = inputs
    ctx.save_for_backward(P)
    ctx.alpha_dtype = alpha.dtype
    ctx.base_dtype = None if base is None else base.dtype


def _backward_expand(ctx, grad):
    P, = ctx.saved_tensors
    grad_alpha = None
    if ctx.needs_input_grad[1]:
        grad_alpha = _PROJECT(P, grad)
        grad_alpha = grad_alpha.to(ctx.alpha_dtype)
    grad_base = None
    if ctx.base_dtype is not None and ctx.needs_input_grad[2]:
        grad_base = grad.to(ctx.base_dtype)
    return None, grad_alpha, grad_base


torch.library.register_autograd("lowrank_kernels::subspace_project", _backward_project,
                                setup_context=_setup_project)
torch.library.register_autograd("lowrank_kernels::subspace_expand", _backward_expand,
                                setup_context=_setup_expand)


def subspace_project(P: torch.Tensor, g: torch.Tensor, backend: str | None = None):
    """c = Pᵀ g. P: D×k basis, g: D vector. Returns k, float32 (float64 for float64 inputs).
    backend: None (the device's kernel), or force 'reference' / 'triton' / 'native' (see use_backend)."""
    return on_backend(_PROJECT, backend, P, g)(P, g)


def subspace_expand(P: torch.Tensor, alpha: torch.Tensor, base: torch.Tensor | None = None,
                    backend: str | None = None):
    """w = base + P α. P: D×k basis, α: k coordinates, base: D vector or None. Returns D in
    base's dtype (P's without base), accumulated in float32 (float64 for float64 inputs).
    backend: None (the device's kernel), or force 'reference' / 'triton' / 'native' (see use_backend)."""
    return on_backend(_EXPAND, backend, P, alpha, base)(P, alpha, base)
