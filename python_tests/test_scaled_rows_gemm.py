"""The weighted sum's scaled route for a few rows (csrc/include/lowrank/scaled_rows_gemm.h: the
scaling c_ij e_it fused into a register-tiled rank update, float32, R = B·T ≤ 64 rows) against
the float64 reference with the a priori bound γ_n·M (Higham §3.1): every column tail of the
4 × 24 tiles (d_in mod 24, mod 8), every row tail (m·d_out mod 4), R on both sides of the
64-row limit (the BLAS route above it), T > 1, strided layer tensors, a (B,) coefficient vector,
and two threads. The layer tensors also as row-strided views (rows of a wider tensor: the
kernel's row strides) and with a strided last dim (the BLAS route)."""
import pytest
import torch
from inputs import noncontiguous, rand
from layer_bounds import exact_and_bound
from numerics import U32

from lowrank_kernels import _capabilities as caps
from lowrank_kernels.reference import weighted_sum_linear as ref

native = pytest.mark.skipif(not caps.native_built(), reason="the native extension is not built")

# (B, T, d_in, d_out, m); m = 0: a coefficient vector (B,)
SHAPES = [(1, 1, 1, 1, 0), (3, 1, 7, 5, 1), (16, 1, 24, 3, 4), (16, 1, 31, 7, 3),
          (5, 2, 49, 6, 2), (8, 8, 50, 9, 1), (64, 1, 17, 13, 2), (65, 1, 17, 13, 2),
          (13, 5, 40, 11, 3), (2, 32, 33, 70, 4)]


def _run(A, E, c, bias, route):
    return torch.ops.lowrank_kernels_testing.weighted_sum_tokens(A, E, c, bias, 1, route)


def _expected(A, E, c, bias):
    n = A.shape[0] * A.shape[1] + 8
    return exact_and_bound(ref.weighted_sum_linear, (A, E, c), (bias, 1), n, U32)


def _assert_within(out, expected, what):
    for o, (exact, bound) in zip(out, expected):
        if exact is None:
            assert o is None, what
            continue
        assert o.dtype == torch.float32 and o.shape == exact.shape, what
        err = (o.double() - exact).abs()
        assert bool((err <= bound).all()), f"{what}: max excess {float((err - bound).max()):.3g}"


@native
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("route", ["scaled", "auto"])
def test_few_rows_within_the_bound(shape, route, one_thread):
    B, T, d_in, d_out, m = shape
    f32 = torch.float32
    A = rand(B, T, d_in + 5, dtype=f32, seed=0)[..., :d_in]  # row stride d_in + 5
    E = rand(B, T, d_out + 3, dtype=f32, seed=1)[..., :d_out]
    c = rand(B, *((m,) if m else ()), dtype=f32, seed=2)
    for A_, E_ in ((A, E), (A.contiguous(), E.contiguous()), (noncontiguous(A), noncontiguous(E))):
        for bias in (False, True):
            out = _run(A_, E_, c, bias, route)
            _assert_within(out, _expected(A, E, c, bias), f"{shape} {route} bias={bias}")


@native
def test_two_threads_match_one():
    """Threads share blocks of four rows of W: the same sums, so the same bits."""
    f32 = torch.float32
    A, E = rand(16, 1, 40, dtype=f32, seed=3), rand(16, 1, 37, dtype=f32, seed=4)
    c = rand(16, 3, dtype=f32, seed=5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(A, E, c, True, "scaled")
        torch.set_num_threads(2)
        two = _run(A, E, c, True, "scaled")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
