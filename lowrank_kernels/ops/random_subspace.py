"""lowrank_kernels::random_subspace_expand and ::random_subspace_project — projections with
a random basis P = s·Ω (D×d) that is generated where it is used and never stored:

    random_subspace_expand:   w = base + s·Ω α     (D-vector)
    random_subspace_project:  c = s·Ωᵀ g           (d-vector)

Ω_ij = f(seed, i, j) is the counter-based sketch matrix of sketch_omega (Philox4x32-10 on
(⌊j/4⌋, i), Box–Muller to N(0, 1), or Rademacher ±1), so both ops see the same P and the
memory for P is zero: intrinsic-dimension training of a model with D parameters in d
directions costs O(D + d) memory, D·d generated entries per pass. s = 1/√D makes P's columns
unit vectors in expectation. Autograd: the gradient of expand is (s·Ωᵀ ḡ, ḡ) for (α, base),
of project s·Ω ḡ for g.
"""
import torch

from .. import _checks
from .._registry import Backend, OpSpec, on_backend, register
from ..reference.random_subspace import random_subspace_expand as reference_expand
from ..reference.random_subspace import random_subspace_project as reference_project
from ._common import ALL_FLOAT, check_dist, check_seed

_ALL = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TRITON = {"cpu": (torch.float32, torch.float16),
           "cuda": (torch.float32, torch.float16, torch.bfloat16)}


def check_expand(alpha, seed, D, scale, dist, base):
    if type(alpha) is torch.Tensor and alpha.dtype in ALL_FLOAT and alpha.dim() == 1 and \
            type(seed) is int and 0 <= seed < 2 ** 63 and type(D) is int and D >= 0 and \
            (dist == "gaussian" or dist == "rademacher") and (base is None or (
                type(base) is torch.Tensor and base.dtype in ALL_FLOAT and base.dim() == 1 and
                base.shape[0] == D and base.device == alpha.device and
                (alpha.dtype is torch.float64) == (base.dtype is torch.float64))):
        return alpha  # the common case in one expression; errors come from the checks below
    op = "random_subspace_expand"
    _checks.check_tensor(op, "alpha", alpha, 1, "d: the coordinates")
    _checks.check_float(op, "alpha", alpha)
    check_seed(op, seed)
    check_dist(op, dist)
    if D < 0:
        raise ValueError(f"{op}: D must be >= 0, got {D}")
    if base is not None:
        _checks.check_tensor(op, "base", base, 1, "D: the point the subspace passes through")
        _checks.check_float(op, "base", base)
        _checks.check_dim_match(op, "D", D, "base", base.shape[0], "length")
        _checks.check_same(op, ("alpha", "base"), (alpha, base), "device")
        if (alpha.dtype == torch.float64) != (base.dtype == torch.float64):
            raise TypeError(f"{op}: float64 inputs must all be float64 (alpha: {alpha.dtype}, "
                            f"base: {base.dtype})")
    return alpha


def check_project(g, seed, d, scale, dist):
    if type(g) is torch.Tensor and g.dtype in ALL_FLOAT and g.dim() == 1 and \
            type(seed) is int and 0 <= seed < 2 ** 63 and type(d) is int and d >= 0 and \
            (dist == "gaussian" or dist == "rademacher"):
        return g  # the common case in one expression; errors come from the checks below
    op = "random_subspace_project"
    _checks.check_tensor(op, "g", g, 1, "D: the vector to project")
    _checks.check_float(op, "g", g)
    check_seed(op, seed)
    check_dist(op, dist)
    if d < 0:
        raise ValueError(f"{op}: d must be >= 0, got {d}")
    return g


def fake_expand(alpha, seed, D, scale, dist, base):
    dtype = base.dtype if base is not None else (
        torch.float64 if alpha.dtype == torch.float64 else torch.float32)
    return alpha.new_empty((D,), dtype=dtype)


def fake_project(g, seed, d, scale, dist):
    return g.new_empty((d,), dtype=torch.float64 if g.dtype == torch.float64 else torch.float32)


def _triton_expand(alpha, seed, D, scale, dist, base):
    from ..triton.random_subspace import random_subspace_expand

    return random_subspace_expand(alpha, seed, D, scale, dist == "rademacher", base)


def _triton_project(g, seed, d, scale, dist):
    from ..triton.random_subspace import random_subspace_project

    return random_subspace_project(g, seed, d, scale, dist == "rademacher")


_CPU_BF16 = "bf16 Triton runs on GPU only (the interpreter computes bf16 wrongly)"


def _no_cpu_bf16_expand(alpha, seed, D, scale, dist, base):  # on every call of the CUDA kernel
    if alpha.dtype is torch.bfloat16 and alpha.is_cpu or \
            base is not None and base.dtype is torch.bfloat16 and base.is_cpu:
        return _CPU_BF16
    return None


def _no_cpu_bf16_project(g, seed, d, scale, dist):
    return _CPU_BF16 if g.dtype is torch.bfloat16 and g.is_cpu else None


SPEC_EXPAND = register(OpSpec(
    name="random_subspace_expand",
    schema=("(Tensor alpha, int seed, int D, float scale, str dist='gaussian', "
            "Tensor? base=None) -> Tensor"),
    check=check_expand,
    fake=fake_expand,
    backends={
        "reference": Backend(lambda a, s, D, sc, dist, b: reference_expand(
            a, s, D, sc, dist == "rademacher", b), {"cpu": _ALL, "cuda": _ALL}),
        "triton": Backend(_triton_expand, _TRITON, supports=_no_cpu_bf16_expand),
        "native": Backend(None, {"cpu": _ALL}),  # csrc/random_subspace.cpp: the op itself
    },
    auto={"cpu": ("native",), "cuda": ("triton",)},
    finite_inputs=("alpha", "base"),
))
_EXPAND = torch.ops.lowrank_kernels.random_subspace_expand.default

SPEC_PROJECT = register(OpSpec(
    name="random_subspace_project",
    schema="(Tensor g, int seed, int d, float scale, str dist='gaussian') -> Tensor",
    check=check_project,
    fake=fake_project,
    backends={
        "reference": Backend(lambda g, s, d, sc, dist: reference_project(
            g, s, d, sc, dist == "rademacher"), {"cpu": _ALL, "cuda": _ALL}),
        "triton": Backend(_triton_project, _TRITON, supports=_no_cpu_bf16_project),
        "native": Backend(None, {"cpu": _ALL}),  # csrc/random_subspace.cpp: the op itself
    },
    auto={"cpu": ("native",), "cuda": ("triton",)},
    finite_inputs=("g",),
))
_PROJECT = torch.ops.lowrank_kernels.random_subspace_project.default


def _setup_expand(ctx, inputs, output):
    alpha, seed, D, scale, dist, base = inputs
    ctx.args = (seed, alpha.shape[0], scale, dist)
    ctx.alpha_dtype = alpha.dtype
    ctx.base_dtype = None if base is None else base.dtype


def _backward_expand(ctx, grad):
    seed, d, scale, dist = ctx.args
    grad_alpha = grad_base = None
    if ctx.needs_input_grad[0]:
        grad_alpha = _PROJECT(grad, seed, d, scale, dist).to(ctx.alpha_dtype)
    if ctx.base_dtype is not None and ctx.needs_input_grad[5]:
        grad_base = grad.to(ctx.base_dtype)
    return grad_alpha, None, None, None, None, grad_base


def _setup_project(ctx, inputs, output):
    g, seed, d, scale, dist = inputs
    ctx.args = (seed, g.shape[0], scale, dist)
    ctx.g_dtype = g.dtype


def _backward_project(ctx, grad):
    seed, D, scale, dist = ctx.args
    grad_g = _EXPAND(grad, seed, D, scale, dist, None)
    return grad_g.to(ctx.g_dtype), None, None, None, None


torch.library.register_autograd("lowrank_kernels::random_subspace_expand", _backward_expand,
                                setup_context=_setup_expand)
torch.library.register_autograd("lowrank_kernels::random_subspace_project", _backward_project,
                                setup_context=_setup_project)


def random_subspace_expand(alpha: torch.Tensor, seed: int, D: int, scale: float,
                           dist: str = "gaussian", base: torch.Tensor | None = None,
                           backend: str | None = None) -> torch.Tensor:
    """w = base + s·Ω α with Ω (D×d) the counter-based sketch matrix Ω_ij = f(seed, i, j)
    (see sketch_omega; dist 'gaussian' or 'rademacher'), generated in the kernel, never
    stored. α: d coordinates; base: D vector or None. Returns D in base's dtype (float32
    without base; float64 for float64). backend: None (the device's kernel), or force
    'reference' / 'triton' / 'native' (see use_backend)."""
    return on_backend(_EXPAND, backend, alpha, base)(alpha, seed, D, scale, dist, base)


def random_subspace_project(g: torch.Tensor, seed: int, d: int, scale: float,
                            dist: str = "gaussian", backend: str | None = None) -> torch.Tensor:
    """c = s·Ωᵀ g with Ω (D×d) as in random_subspace_expand. g: D vector. Returns d, float32
    (float64 for float64). backend: None (the device's kernel), or force 'reference' /
    'triton' / 'native' (see use_backend)."""
    return on_backend(_PROJECT, backend, g)(g, seed, d, scale, dist)

