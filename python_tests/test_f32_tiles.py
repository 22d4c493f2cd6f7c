"""The float32 register tiles of the CPU layer kernels (csrc/include/lowrank/f32_tiles.h) through
the ops that take them, against the float64 reference with the a priori bounds of
test_cpu_kernels (γ_n times the same computation on |inputs|):
- the symmetric T = 1 Gram (tiles::syrk_lower on A and E, the (SA + b) ⊙ SE pass and the
  mirror): B across the 3 × 4 dot tiles (partial ones included), d across their 8-column steps
  and masked tails and the 1024-column blocks, strided rows, groups, two threads;
- the per-sample route's G_i = E_iᵀ A_i in place (tiles::xt_y) and its G Gᵀ by syrk_lower
  (every B), with several gradient blocks accumulated, T across the 256-row blocks;
- the cross-Gram and the diagonal at the same shapes (their paths unchanged) for comparison."""
import pytest
import torch
from inputs import rand
from layer_bounds import exact_and_bound
from numerics import assert_within

from lowrank_kernels import _capabilities as caps
from lowrank_kernels.reference import gram_linear as ref_gram_linear

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not caps.native_built(), reason="the native extension is not built")]


def _gram_tokens(A, E, bias, A2, E2, diagonal, route, groups=1):
    return torch.ops.lowrank_kernels_testing.gram_tokens(A, E, bias, A2, E2, diagonal, route,
                                                         groups)


def _check_gram(A, E, bias, second, diagonal, route, groups, what):
    T = A.shape[1] if A.dim() == 3 else 1
    d_in, d_out = A.shape[-1] // groups, E.shape[-1] // groups
    n = max(d_in + 1 + d_out + T * T, T + d_out * (d_in + 1)) + groups + 3

    def run(A_, E_, A2_, E2_):
        return ref_gram_linear.gram_linear(A_, E_, bias, A2_, E2_, diagonal, "token_pair", groups)

    [(exact, bound)] = exact_and_bound(run, (A, E, *second), (), n)
    K = _gram_tokens(A, E, bias, *second, diagonal, route, groups)
    assert K.dtype == torch.float32 and K.shape == exact.shape, what
    assert_within(K, exact, bound, what)
    if second[0] is None and not diagonal:
        assert torch.equal(K, K.T), f"{what}: K must be exactly symmetric"
    return K


# (B, d_in, d_out): row groups of 3 and column groups of 4 (full, partial, one), 8-column steps
# and their masked tails, 1024-column blocks (one, several, a partial last one).
SYMMETRIC = [(1, 3, 2), (5, 8, 9), (6, 1, 7), (7, 16, 15), (16, 255, 17), (17, 256, 257),
             (33, 600, 40), (97, 9, 520), (130, 300, 64), (11, 1024, 1031), (14, 2053, 5)]


@pytest.mark.parametrize("shape", SYMMETRIC, ids=lambda s: "x".join(map(str, s)))
def test_symmetric_gram_t1(shape):
    B, d_in, d_out = shape
    A, E = rand(B, d_in, dtype=torch.float32, seed=0), rand(B, d_out, dtype=torch.float32, seed=1)
    A2, E2 = rand(3, d_in, dtype=torch.float32, seed=2), rand(3, d_out, dtype=torch.float32, seed=3)
    for bias in (False, True):
        K = _check_gram(A, E, bias, (None, None), False, "token_pair", 1, f"{shape} bias={bias}")
        # strided rows (a column slice of wider tensors): the same values
        Aw = torch.cat([A, rand(B, 5, dtype=torch.float32, seed=4)], 1)[:, :d_in]
        Ew = torch.cat([rand(B, 3, dtype=torch.float32, seed=5), E], 1)[:, 3:]
        assert torch.equal(_gram_tokens(Aw, Ew, bias, None, None, False, "token_pair"), K)
        _check_gram(A, E, bias, (A2, E2), False, "token_pair", 1, f"{shape} cross")
        _check_gram(A, E, bias, (None, None), True, "token_pair", 1, f"{shape} diagonal")


@pytest.mark.parametrize("groups", [2, 3])
def test_symmetric_gram_t1_groups(groups):
    A = rand(43, groups * 37, dtype=torch.float32, seed=6)
    E = rand(43, groups * 21, dtype=torch.float32, seed=7)
    for bias in (False, True):
        _check_gram(A, E, bias, (None, None), False, "token_pair", groups, f"G={groups}")


def test_symmetric_gram_two_threads():
    """The threaded paths: column groups shared in long/short order, the pass by 8-row blocks, the
    per-sample gradients by sample; the same values as with one thread."""
    A, E = rand(150, 300, dtype=torch.float32, seed=8), rand(150, 70, dtype=torch.float32, seed=9)
    At, Et = rand(40, 5, 24, dtype=torch.float32, seed=10), rand(40, 5, 12, dtype=torch.float32, seed=11)
    one = [_gram_tokens(A, E, True, None, None, False, "token_pair"),
           _gram_tokens(At, Et, True, None, None, False, "per_sample")]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = [_check_gram(A, E, True, (None, None), False, "token_pair", 1, "2 threads T=1"),
               _check_gram(At, Et, True, (None, None), False, "per_sample", 1, "2 threads")]
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


# (B, T, d_in, d_out): B of one or two 4-row groups of syrk_lower and more, T across the 256-row
# blocks of xt_y, d_out·d_in past 2²² / B (several gradient blocks accumulated), tails of 6 and
# 16, d_out·d_in past syrk_lower's 1024-column blocks.
PER_SAMPLE = [(4, 64, 64, 19), (5, 3, 17, 7), (33, 7, 13, 11), (40, 300, 20, 9),
              (36, 2, 520, 230), (1, 5, 9, 4), (2, 3, 40, 30)]


@pytest.mark.parametrize("shape", PER_SAMPLE, ids=lambda s: "x".join(map(str, s)))
def test_per_sample_route_tiles(shape):
    B, T, d_in, d_out = shape
    A = rand(B, T, d_in, dtype=torch.float32, seed=12)
    E = rand(B, T, d_out, dtype=torch.float32, seed=13)
    A2, E2 = rand(3, T, d_in, dtype=torch.float32, seed=14), rand(3, T, d_out, dtype=torch.float32, seed=15)
    for bias in (False, True):
        _check_gram(A, E, bias, (None, None), False, "per_sample", 1, f"{shape} bias={bias}")
        _check_gram(A, E, bias, (A2, E2), False, "per_sample", 1, f"{shape} cross")
        _check_gram(A, E, bias, (None, None), True, "per_sample", 1, f"{shape} diagonal")
    # token rows of stride > width (a slice of wider tokens), and a transposed view (no unit
    # last stride: the bmm path): the same values up to the bound
    Aw = torch.cat([A, A[..., :2]], 2)[..., :d_in]
    _check_gram(Aw, E, True, (None, None), False, "per_sample", 1, f"{shape} strided")
    Et = E.transpose(1, 2).contiguous().transpose(1, 2)
    _check_gram(A, Et, True, (None, None), False, "per_sample", 1, f"{shape} column-major E")
