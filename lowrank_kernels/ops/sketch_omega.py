"""lowrank_kernels::sketch_omega — the sketch matrix Ω itself, Ω[rows, c0:c0+k] (float32), from
the counter-based definition Ω_ij = f(seed, i, j) (Philox4x32-10 + Box–Muller in float32, or
Rademacher signs; see lowrank_kernels/reference/sketch_omega.py). The fused sketch kernels
never store Ω; this op materializes rows of it for tests, debugging and operator inputs."""
import torch

from .. import _checks
from .._registry import Backend, OpSpec, on_backend, register
from ..reference.sketch_omega import sketch_omega as reference_sketch_omega
from ._common import DISTS, check_dist, check_seed  # noqa: F401  (DISTS: for the sketch API)

OP = "sketch_omega"






def check(rows, k, seed, dist, col_offset):
    if type(rows) is torch.Tensor and rows.dtype is torch.int64 and rows.dim() == 1 and \
            k >= 0 and (dist == "gaussian" or dist == "rademacher") and col_offset >= 0 and \
            not col_offset % 4 and type(seed) is int and 0 <= seed < 2 ** 63:
        return rows  # the common case in one expression; errors come from the checks below
    _checks.check_tensor(OP, "rows", rows, 1, "row indices i of Ω")
    if rows.dtype != torch.int64:
        raise TypeError(f"{OP}: rows must be int64, got {rows.dtype}")
    if k < 0:
        raise ValueError(f"{OP}: k must be >= 0, got {k}")
    check_seed(OP, seed)
    check_dist(OP, dist)
    if col_offset < 0 or col_offset % 4:
        raise ValueError(f"{OP}: col_offset must be a multiple of 4 and >= 0, got {col_offset}")
    return rows


def _check_rows_nonnegative(rows):
    # A value check, asserted on the device (no host sync); fake tensors never reach it.
    if rows.numel():
        torch._assert_async((rows >= 0).all(), f"{OP}: rows must be >= 0")


def fake(rows, k, seed, dist, col_offset):
    return rows.new_empty((rows.shape[0], k), dtype=torch.float32)


def _reference(rows, k, seed, dist, col_offset):
    _check_rows_nonnegative(rows)
    return reference_sketch_omega(rows, k, seed, dist == "rademacher", col_offset)


def _triton(rows, k, seed, dist, col_offset):
    _check_rows_nonnegative(rows)
    from ..triton.sketch_omega import sketch_omega as triton_sketch_omega

    return triton_sketch_omega(rows, k, seed, dist == "rademacher", col_offset)


_ROWS = (torch.int64,)  # what every backend takes: int64 rows (Ω is float32)
SPEC = register(OpSpec(
    name=OP,
    schema=("(Tensor rows, int k, int seed=0, str dist='gaussian', int col_offset=0"
            ") -> Tensor"),
    check=check,
    fake=fake,
    backends={
        "reference": Backend(_reference, {"cpu": _ROWS, "cuda": _ROWS}),
        "triton": Backend(_triton, {"cpu": _ROWS, "cuda": _ROWS}),
        "native": Backend(None, {"cpu": _ROWS}),  # the C++ kernel: the op itself
    },
    auto={"cpu": ("native",), "cuda": ("triton",)},
))
_OP = torch.ops.lowrank_kernels.sketch_omega.default


def sketch_omega(rows: torch.Tensor, k: int, seed: int = 0, dist: str = "gaussian",
                 col_offset: int = 0, backend: str | None = None) -> torch.Tensor:
    """Ω[rows, col_offset : col_offset + k] (len(rows) × k float32) of the sketch matrix
    Ω_ij = f(seed, i, j):

        (x0..x3) = Philox4x32-10(key = (lo32 seed, hi32 seed), counter = (⌊j/4⌋, lo32 i, hi32 i, 0))
        gaussian:   Box–Muller of (a, b) = (x0, x1) for j mod 4 ∈ {0,1} (cos, sin) and (x2, x3)
                    for j mod 4 ∈ {2,3}: r = √(−2 ln u), u = (a + ½)2⁻³², θ = 2π(b + ½)2⁻³²,
                    in float32 operation by operation (ln: Cephes logf, log1p form for
                    u > ½; cos/sin: octant of b + Cephes polynomials), within 4 float32 ulps
                    of the float64 formula
        rademacher: 1 − 2·(x_{j mod 4} >> 31)

    The same Ω bit for bit from the reference, the native CPU kernel and Triton's interpreter;
    compiled Triton (CUDA) fuses a·b + c into FMAs (not yet measured on a GPU; tests allow 2 ulps).
    rows: 1-D int64 indices ≥ 0; 0 ≤ seed < 2⁶³; col_offset a multiple of 4 (one Philox call
    covers columns 4g .. 4g+3). backend: None (the device's kernel), or force 'reference' /
    'triton' / 'native' (see use_backend)."""
    check_seed(OP, seed)
    return on_backend(_OP, backend)(rows, k, seed, dist, col_offset)
