"""lowrank_kernels::fwht — the fast Walsh–Hadamard transform along the last dimension:

    y = H_n x,   (H_n)_{ij} = (−1)^{popcount(i & j)},   n = 2^m,

unnormalized (H_n H_n = n I). fp32 arithmetic (fp64 on the reference backend for fp64
input), y in x's dtype. The building block of the Fastfood projection (intrinsic
dimension). H_n is symmetric, so the gradient is H_n ḡ.
"""
import torch

from .. import _checks
from .._registry import Backend, OpSpec, on_backend, register
from ..reference.fwht import fwht as reference_fwht

OP = "fwht"


def check(x):
    if type(x) is torch.Tensor and x.dtype in _ALL and x.dim():
        n = x.shape[-1]
        if n >= 1 and not n & (n - 1):
            return x  # the common case; errors come from the checks below
    _checks.check_tensor(OP, "x", x, None)
    _checks.check_float(OP, "x", x)
    if x.dim() == 0:
        raise ValueError(f"{OP}: x must have at least 1 dimension (the transform runs along "
                         "the last), got a 0-D tensor")
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"{OP}: x's last dimension must be a power of two, got {n}")
    return x


def fake(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _triton(x):
    from ..triton.fwht import fwht

    return fwht(x)


_ALL = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SPEC = register(OpSpec(
    name=OP,
    schema="(Tensor x) -> Tensor",
    check=check,
    fake=fake,
    backends={
        "reference": Backend(lambda x: reference_fwht(x).contiguous(), {"cpu": _ALL, "cuda": _ALL}),
        # bf16 stores are wrong under the interpreter: bf16 Triton is GPU-only.
        "triton": Backend(_triton, {"cpu": (torch.float32, torch.float16),
                                    "cuda": (torch.float32, torch.float16, torch.bfloat16)}),
        "native": Backend(None, {"cpu": _ALL}),  # the C++ kernel (csrc/fwht.cpp): the op itself
    },
    auto={"cpu": ("native",), "cuda": ("triton",)},
    finite_inputs=("x",),
))


_OP = torch.ops.lowrank_kernels.fwht.default


def _backward(ctx, grad):
    return _OP(grad)  # H_n is symmetric


torch.library.register_autograd("lowrank_kernels::fwht", _backward)


def fwht(x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """y = H_n x along the last dimension (n = 2^m; unnormalized Sylvester Hadamard matrix,
    (H_n)_{ij} = (−1)^{popcount(i & j)}). Returns x's shape and dtype (fp32 arithmetic;
    fp64 for fp64 on the reference backend). backend: None (the device's kernel), or force
    'reference' / 'triton' (see use_backend)."""
    return on_backend(_OP, backend, x)(x)
