"""lowrank_kernels::gram_linear — the per-sample-gradient Gram of a linear layer:

    K_ij = ⟨g_i, g_j⟩ = (a_i·a_j + b)(e_i·e_j),   i.e. K = (A Aᵀ + b) ⊙ (E Eᵀ),

with g_i = e_i a_iᵀ the per-sample gradient of the weight (and of the bias when bias=True,
b = 1), A (B×d_in) the layer inputs and E (B×d_out) the gradients of its outputs. Output:
B×B float32 (float64 for float64 inputs on the reference backend); only the tiles on and
above the diagonal are computed, the rest mirrored.
"""
import torch

from .. import _capabilities as caps
from .. import _checks
from .._registry import Backend, OpSpec, register
from ..reference.gram_linear import gram_linear as reference_gram_linear

OP = "gram_linear"


def check(A, E, bias):
    _checks.check_tensor(OP, "A", A, 2, "B x d_in: layer inputs")
    _checks.check_tensor(OP, "E", E, 2, "B x d_out: gradients of the layer outputs")
    _checks.check_float(OP, "A", A)
    _checks.check_float(OP, "E", E)
    _checks.check_same(OP, ("A", "E"), (A, E), "device")
    _checks.check_same(OP, ("A", "E"), (A, E), "dtype")
    _checks.check_dim_match(OP, "A", A.shape[0], "E", E.shape[0], "batch size B (dim 0)")
    return A


def fake(A, E, bias):
    dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    return A.new_empty((A.shape[0], A.shape[0]), dtype=dtype)


def _triton(A, E, bias):
    from ..triton.gram_linear import gram_linear as triton_gram_linear

    return triton_gram_linear(A, E, bias)


def _native(A, E, bias):
    return torch.ops.lowrank_native.gram_linear(A, E, bias)


if caps.native_built():
    @torch.library.register_fake("lowrank_native::gram_linear")
    def _native_fake(A, E, bias):
        return A.new_empty((A.shape[0], A.shape[0]), dtype=torch.float32)


_ALL = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SPEC = register(OpSpec(
    name=OP,
    schema="(Tensor A, Tensor E, bool bias=False, str? backend=None) -> Tensor",
    check=check,
    fake=fake,
    backends={
        "reference": Backend(reference_gram_linear, {"cpu": _ALL, "cuda": _ALL}),
        # The interpreter computes bf16 wrongly (see DESIGN §4): bf16 Triton is GPU-only.
        "triton": Backend(_triton, {"cpu": (torch.float32, torch.float16),
                                    "cuda": (torch.float32, torch.float16, torch.bfloat16)}),
        "native": Backend(_native, {"cpu": (torch.float32, torch.float16),
                                    "cuda": (torch.float32, torch.float16, torch.bfloat16)}),
    },
    auto={"cpu": ("native", "reference"), "cuda": ("triton", "native", "reference")},
    finite_inputs=("A", "E"),
    doc="K = (A Aᵀ + b) ⊙ (E Eᵀ)",
))


def gram_linear(A: torch.Tensor, E: torch.Tensor, bias: bool = False, backend: str | None = None):
    """Per-sample-gradient Gram of a linear layer, K = (A Aᵀ + b) ⊙ (E Eᵀ) (b = 1 with bias).

    A: B×d_in layer inputs, E: B×d_out output gradients (same dtype and device).
    backend: 'auto' (default, or $LOWRANK_BACKEND), 'reference', 'triton' or 'native'.
    Returns B×B float32 (float64 for float64 inputs)."""
    return torch.ops.lowrank_kernels.gram_linear(A, E, bias, backend)
