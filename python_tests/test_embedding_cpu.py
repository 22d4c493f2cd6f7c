"""The embedding ops' CPU kernels (C++, csrc/gram_embedding.cpp, weighted_sum_embedding.cpp,
project_embedding.cpp; the ops' CPU kernels) against the float64 reference with a priori bounds
(Higham §3.1: γ_n times the same computation on |inputs|), at odd shapes (B = 1, primes), size-0
dims, non-contiguous inputs, fp32, fp16 (fp32 accumulation) and float64, through each route of
the Gram (token pair; used rows in one and in several blocks, by a lookup table or a sort of
the rows, with a triangle of row blocks at B >= 128) and the diagonal."""
import pytest
import torch
from inputs import noncontiguous, rand
from layer_bounds import exact_and_bound
from numerics import U32, U64, assert_within

import lowrank_kernels as lk
from lowrank_kernels.reference import gram_embedding as ref_gram_embedding
from lowrank_kernels.reference import project_embedding as ref_project_embedding
from lowrank_kernels.reference import weighted_sum_embedding as ref_weighted_sum_embedding

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [torch.float32, torch.float16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "fp64"]
def _check(out, run, tensors, n, dtype, what):
    """out in the accumulation dtype, of the exact shape, within γ_n·M of run(*tensors) in
    float64 (with float64's unit roundoff for float64 inputs)."""
    ((exact, bound),) = exact_and_bound(run, tensors, (), n,
                                        u_extra=U32 if dtype != torch.float64 else 0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == acc and out.shape == exact.shape, \
        f"{what}: {out.dtype} {tuple(out.shape)} against {tuple(exact.shape)}"
    assert_within(out, exact, bound * (U64 / U32 if dtype == torch.float64 else 1), what)


# (B, T, N, d, B2, T2, padding_idx)
EMBEDDING_SHAPES = [(1, 1, 1, 1, 1, 1, None), (7, 11, 13, 5, 3, 2, 0), (131, 3, 50, 4, 5, 3, 49),
                    (3, 5, 4, 3, 2, 7, None), (4, 6, 3, 0, 2, 2, None),
                    # the used-rows route, its K by blocks of the upper triangle (B >= 128)
                    (130, 8, 4, 3, 2, 5, 1),
                    # the token-pair route (all tokens of a batch distinct: no rows shared)
                    (13, 2, 1000, 5, 11, 1, 0),
                    # a table far larger than the tokens: the used rows ranked by a sort; the
                    # weighted sum (m = 3: > 8 MiB) by non-temporal stores, rows 16-byte aligned
                    # (d = 4) and not (d = 7)
                    (3, 5, 200003, 4, 2, 3, 0), (2, 7, 150001, 7, 1, 1, 3),
                    # used rows in blocks ((B + B2)·d·R > 2^22 entries: 2, cross-Gram 4)
                    (40, 64, 2000, 128, 40, 64, None)]


def _idx(B, T, N, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, T, generator=g) ** 3 * N).long().clamp_(max=N - 1)


def _gram_cases(shape):
    """The (B, B2)-shaped Grams and diagonals of one shape, the token indices of the first batch
    drawn as text is (Zipf-like: the used-rows route) and all distinct (the token-pair route)."""
    B, T, N, d, B2, T2, pad = shape
    idx2 = _idx(B2, T2, N, 1)
    distinct = torch.randperm(N, generator=torch.Generator().manual_seed(6))[:B * T]
    for idx in (_idx(B, T, N, 0),) + ((distinct.view(B, T),) if B * T <= min(N, 512) else ()):
        # cross-diagonal: a second batch of B samples (a non-contiguous view)
        for idx2_, diagonal in ((None, False), (idx2, False), (None, True),
                                (idx2[:1].expand(B, T2), True)):
            yield idx, idx2_, diagonal


def _gram_params():
    """(shape, dtype) pairs: every dtype, but the blocked shapes in fp32 only (time)."""
    for shape in EMBEDDING_SHAPES:
        B, T, _, d = shape[:4]
        for dtype, name in zip(DTYPES, DTYPE_IDS):
            if d * B * T <= 100_000 or dtype == torch.float32:
                yield pytest.param(shape, dtype, id=f"{'x'.join(map(str, shape))}-{name}")


@pytest.mark.parametrize("shape,dtype", list(_gram_params()))
def test_gram_embedding(shape, dtype):
    B, T, N, d, B2, T2, pad = shape
    E = rand(B, T, d, dtype=dtype, seed=2)
    for idx, idx2, diagonal in _gram_cases(shape):
        E2 = None if idx2 is None else rand(*idx2.shape, d, dtype=dtype, seed=3)
        n = T + T2 + (B * T + B2 * T2) * d + T * T2 + d + 4
        K = lk.gram_embedding(idx, E, N, pad, idx2=idx2, E2=E2, diagonal=diagonal,
                              backend="native")
        tensors = (E,) if idx2 is None else (E, E2)

        def run(E_, E2_=None, idx=idx, idx2=idx2, diagonal=diagonal):
            return ref_gram_embedding.gram_embedding(idx, E_, N, pad, idx2, E2_, diagonal)

        _check(K, run, tensors, n, dtype, f"cross={idx2 is not None} diagonal={diagonal}")
        if idx2 is None and not diagonal:
            assert torch.equal(K, K.T)
    K = lk.gram_embedding(idx, noncontiguous(E), N, pad, backend="native")
    _check(K, lambda E_: ref_gram_embedding.gram_embedding(idx, E_, N, pad), (E,), n, dtype,
           "non-contiguous")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [s for s in EMBEDDING_SHAPES if s[0] * s[1] * s[3] < 10_000]
                         + [(3, 0, 4, 2, 1, 1, None)],
                         ids=lambda s: "x".join(map(str, s)))
def test_weighted_sum_and_project_embedding(shape, dtype):
    B, T, N, d, _, _, pad = shape
    idx = _idx(B, T, N, 0)
    E = rand(B, T, d, dtype=dtype, seed=2)
    for m in (0, 3):
        c = rand(B, *((m,) if m else ()), dtype=dtype, seed=4)
        V = rand(*((m,) if m else ()), N, d, dtype=dtype, seed=5)
        for E_ in (E, noncontiguous(E)):
            out = lk.weighted_sum_embedding(idx, E_, c, N, pad, backend="native")
            _check(out, lambda E1, c1: ref_weighted_sum_embedding.weighted_sum_embedding(
                idx, E1, c1, N, pad), (E, c), B * T + 2, dtype, f"U c m={m}")
            out = lk.project_embedding(idx, E_, V, pad, backend="native")
            _check(out, lambda E1, V1: ref_project_embedding.project_embedding(
                idx, E1, V1, pad), (E, V), T * d + 3, dtype, f"Uᵀ V m={m}")
    if N > 1:  # m = 3 directions V with a strided last dim
        out = lk.project_embedding(idx, E, noncontiguous(V), pad, backend="native")
        _check(out, lambda E1, V1: ref_project_embedding.project_embedding(
            idx, E1, V1, pad), (E, V), T * d + 3, dtype, "Uᵀ V strided V")
