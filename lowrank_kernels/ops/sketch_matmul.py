"""lowrank_kernels::sketch_matmul — the product of a matrix with the sketch matrix Ω, with Ω
generated from (seed, row, column) by a counter-based RNG (Philox; see sketch_omega), never
stored as a whole:

    transpose=False:  Y = M Ω,   M m×n, Ω_ij = f(seed, row_offset + i, j) (n × k)  → Y m×k
    transpose=True:   Y = Ωᵀ M,  M m×n, Ω_ij = f(seed, row_offset + i, j) (m × k)  → Y k×n

Triton: Ω tiles generated in registers inside the GEMM (no memory for Ω). Native (CPU,
csrc/sketch_matmul.cpp): Ω generated in row blocks of about 2¹⁸ entries by the C++ Philox
(lowrank/philox_lanes.h, AVX2 where the CPU has it), each block into one GEMM. Reference: row
blocks of ≤ 2²⁰ entries from the PyTorch Philox, then torch.mm. Output float32 (float64 for
float64 M).
"""
import torch

from .. import _checks
from .._registry import Backend, OpSpec, on_backend, register
from ..reference.sketch_matmul import sketch_matmul as reference_sketch_matmul
from ._common import ALL_FLOAT, check_dist, check_seed

OP = "sketch_matmul"


def check(M, k, seed, dist, transpose, row_offset):
    if type(M) is torch.Tensor and M.dtype in ALL_FLOAT and M.dim() == 2 and type(k) is int and \
            k >= 1 and type(seed) is int and 0 <= seed < 2 ** 63 and \
            (dist == "gaussian" or dist == "rademacher") and type(row_offset) is int and \
            row_offset >= 0:
        return M  # the common case in one expression; errors come from the checks below
    _checks.check_tensor(OP, "M", M, 2, "m x n matrix")
    _checks.check_float(OP, "M", M)
    if k < 1:
        raise ValueError(f"{OP}: k (columns of Ω) must be >= 1, got {k}")
    check_seed(OP, seed)
    check_dist(OP, dist)
    if row_offset < 0:
        raise ValueError(f"{OP}: row_offset must be >= 0, got {row_offset}")
    return M


def fake(M, k, seed, dist, transpose, row_offset):
    dtype = torch.float64 if M.dtype == torch.float64 else torch.float32
    shape = (k, M.shape[1]) if transpose else (M.shape[0], k)
    return M.new_empty(shape, dtype=dtype)


def _reference(M, k, seed, dist, transpose, row_offset):
    return reference_sketch_matmul(M, k, seed, dist == "rademacher", transpose, row_offset)


def _triton(M, k, seed, dist, transpose, row_offset):
    from ..triton.sketch_matmul import sketch_matmul as triton_sketch_matmul

    return triton_sketch_matmul(M, k, seed, dist == "rademacher", transpose, row_offset)


_ALL = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_LOW = (torch.float32, torch.float16, torch.bfloat16)
SPEC = register(OpSpec(
    name=OP,
    schema=("(Tensor M, int k, int seed=0, str dist='gaussian', bool transpose=False, "
            "int row_offset=0) -> Tensor"),
    check=check,
    fake=fake,
    backends={
        "reference": Backend(_reference, {"cpu": _ALL, "cuda": _ALL}),
        # The interpreter computes bf16 wrongly (see DESIGN §4): bf16 Triton is GPU-only.
        "triton": Backend(_triton, {"cpu": (torch.float32, torch.float16), "cuda": _LOW}),
        "native": Backend(None, {"cpu": _ALL}),  # csrc/sketch_matmul.cpp: the op itself
    },
    auto={"cpu": ("native",), "cuda": ("triton",)},
    finite_inputs=("M",),
))
_OP = torch.ops.lowrank_kernels.sketch_matmul.default


def sketch_matmul(M: torch.Tensor, k: int, seed: int = 0, dist: str = "gaussian",
                  transpose: bool = False, row_offset: int = 0,
                  backend: str | None = None) -> torch.Tensor:
    """Y = M Ω (m × k) or, transpose=True, Y = Ωᵀ M (k × n), Ω_ij = f(seed, row_offset + i, j)
    the counter-based sketch matrix (see sketch_omega; 'gaussian' N(0,1) or 'rademacher' ±1
    entries, unscaled: E[Ω Ωᵀ] = k·I). Ω is generated, never stored (Triton: in registers;
    native/reference: in row blocks). M: 2-D, any strides.
    backend: None (the device's kernel), or force 'reference' / 'native' / 'triton'.
    Returns float32 (float64 for float64 M)."""
    return on_backend(_OP, backend)(M, k, seed, dist, transpose, row_offset)
