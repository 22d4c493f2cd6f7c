"""range_finder and orthonormalize against float64: the Halko–Martinsson–Tropp bounds,
orthonormality to a small multiple of u·l, the Householder fallback (asserted taken),
rank-deficient M, operator callbacks, Rademacher, odd shapes, non-contiguous M."""
import math

import pytest
import torch
from conftest import backends_for

import lowrank_kernels as lk


pytestmark = pytest.mark.usefixtures("one_thread")


UNIT = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}


def _matrix(m, n, decay=0.8, seed=0, rank=None):
    """M = U diag(σ) Vᵀ (float64) with σ_j = decay^j (zero past `rank`)."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    sigma = decay ** torch.arange(r, dtype=torch.float64)
    if rank is not None:
        sigma[rank:] = 0
    return (U * sigma) @ V.T, sigma


def _error(M, Q):
    """‖M − QQᵀM‖₂ / ‖M‖₂ in float64."""
    Q = Q.double()
    return float(torch.linalg.matrix_norm(M - Q @ (Q.T @ M), 2) / torch.linalg.matrix_norm(M, 2))


def _orthonormality(Q):
    Q = Q.double()
    return float(torch.linalg.matrix_norm(Q.T @ Q - torch.eye(Q.shape[1], dtype=Q.dtype)))


def _hmt_expected(sigma, k, p, q):
    """HMT Cor. 10.10: E‖M − QQᵀM‖ ≤ [(1 + √(k/(p−1))) σ_{k+1}^{2q+1}
    + e√(k+p)/p (Σ_{j>k} σ_j^{2(2q+1)})^½]^{1/(2q+1)}."""
    s = sigma ** (2 * q + 1)
    bound = (1 + math.sqrt(k / (p - 1))) * s[k] + math.e * math.sqrt(k + p) / p * s[k:].norm()
    return float(bound) ** (1 / (2 * q + 1))


def _hmt_tail(sigma, k, p, t=5.0, u=5.0):
    """HMT Thm 10.8 (power_iters = 0; more iterations only lower the error): ‖M − QQᵀM‖ ≤
    [1 + t√(3k/(p+1))] σ_{k+1} + t e√(k+p)/(p+1) (Σ_{j>k} σ_j²)^½ + u t e√(k+p)/(p+1) σ_{k+1},
    failing with probability ≤ 2t^−p + e^(−u²/2) (< 4·10⁻⁶ at t = u = 5, p = 10)."""
    c = t * math.e * math.sqrt(k + p) / (p + 1)
    return float((1 + t * math.sqrt(3 * k / (p + 1))) * sigma[k] + c * sigma[k:].norm()
                 + u * c * sigma[k])


# float64 sketches run on the reference backend only.
CASES = [pytest.param(b, torch.float32, id=f"{b}-fp32")
         for b in backends_for("sketch_matmul", "cpu")]
CASES.append(pytest.param("reference", torch.float64, id="reference-fp64"))


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("power_iters", [0, 1])
def test_hmt_bounds_and_orthonormality(backend, dtype, power_iters):
    m, n, k, p = 67, 45, 8, 10
    M, sigma = _matrix(m, n, decay=0.6)  # fast enough decay for the tail bound to bite
    errors = []
    for seed in range(4 if backend == "triton" else 10):
        Q, stats = lk.range_finder(M.to(dtype), k, oversample=p, power_iters=power_iters,
                                   seed=seed, backend=backend, return_stats=True)
        assert Q.shape == (m, k + p) and Q.dtype == dtype
        assert len(stats.orthonormalizations) == 1 + 2 * power_iters
        # κ(Y) ≈ σ₁/σ₁₈ ≈ 6·10³: Cholesky-QR2 is fine in float64 (κ² u ≪ 1); in float32
        # (κ² u > 1) the first sketch's Gram is numerically singular and Householder takes over.
        if dtype == torch.float64:
            assert stats.fallbacks == 0
        delta = _orthonormality(Q)
        assert delta <= 10 * UNIT[dtype] * (k + p)
        err = _error(M, Q)
        # Eckart–Young: no rank-(k+p) projection beats σ_{k+p+1} (QQᵀ is a projector up to
        # ‖QᵀQ − I‖ ≤ δ, which moves the error by at most 2δ‖M‖); HMT's tail bound.
        assert err >= float(sigma[k + p]) * (1 - 1e-9) - 2 * delta
        assert err <= _hmt_tail(sigma, k, p)
        errors.append(err)
    assert sum(errors) / len(errors) <= _hmt_expected(sigma, k, p, power_iters)


def test_power_iterations_help_on_a_slow_spectrum():
    M, sigma = _matrix(90, 70, decay=0.97)
    errs = [_error(M, lk.range_finder(M, 10, oversample=5, power_iters=q, seed=1))
            for q in (0, 1, 2)]
    assert errs[0] > errs[1] > errs[2] >= float(sigma[15])


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_rademacher_and_gaussian_on_odd_shapes(dist):
    for (m, n, k) in [(45, 67, 5), (7, 3, 2), (1, 1, 1), (31, 30, 29)]:
        M, sigma = _matrix(m, n, seed=m)
        Q = lk.range_finder(M, k, dist=dist, power_iters=1)
        l = min(k + 10, m, n)
        assert Q.shape == (m, l)
        assert _orthonormality(Q) <= 10 * UNIT[torch.float64] * l
        if l == min(m, n):  # the sketch spans all of range(M)
            assert _error(M, Q) <= 1e-13
        else:
            assert _error(M, Q) <= _hmt_tail(sigma, k, 10)


def test_noncontiguous_input_matches_contiguous():
    M, _ = _matrix(40, 90)
    X = M.T  # 90 × 40, strides (1, 90)
    assert not X.is_contiguous()
    Q1 = lk.range_finder(X, 6, seed=3)
    Q2 = lk.range_finder(X.contiguous(), 6, seed=3)
    torch.testing.assert_close(Q1, Q2, rtol=0, atol=1e-12)
    sliced = torch.cat([M, M], 1)[:, ::2]  # 40 × 90, column stride 2
    Q3 = lk.range_finder(sliced, 6, seed=3)
    torch.testing.assert_close(Q3, lk.range_finder(sliced.contiguous(), 6, seed=3), rtol=0,
                               atol=1e-12)


def test_rank_deficient_matrix_takes_the_householder_fallback():
    M, _ = _matrix(67, 45, rank=5)
    for dtype in (torch.float64, torch.float32):
        Q, stats = lk.range_finder(M.to(dtype), 8, power_iters=1, ortho="cholqr2",
                                   return_stats=True)
        assert stats.fallbacks >= 1
        assert all(i.method == "householder" for i in stats.orthonormalizations if i.fallback)
        assert _orthonormality(Q) <= 10 * UNIT[dtype] * Q.shape[1]
        assert _error(M, Q) <= 50 * UNIT[dtype] * math.sqrt(67 * 45)
        # The default on a CPU ('auto'): Householder QR throughout, no fallback needed.
        Q, stats = lk.range_finder(M.to(dtype), 8, power_iters=1, return_stats=True)
        assert all(i.method == "householder" and not i.fallback
                   for i in stats.orthonormalizations)
        assert _orthonormality(Q) <= 10 * UNIT[dtype] * Q.shape[1]
        assert _error(M, Q) <= 50 * UNIT[dtype] * math.sqrt(67 * 45)


def test_orthonormalize_fallback_on_ill_conditioned_input():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(300, 20, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    for dtype, kappa, fallback in [(torch.float32, 1e2, False), (torch.float32, 1e6, True),
                                   (torch.float64, 1e6, False), (torch.float64, 1e12, True)]:
        Y = ((U * torch.logspace(0, -math.log10(kappa), 20, dtype=torch.float64)) @ V.T).to(dtype)
        Q, R, info = lk.orthonormalize(Y, return_r=True, return_info=True)
        assert info.fallback is fallback and info.method == ("householder" if fallback
                                                            else "cholqr2"), (dtype, kappa)
        assert _orthonormality(Q) <= 10 * UNIT[dtype] * 20
        resid = torch.linalg.matrix_norm(Q.double() @ R.double() - Y.double())
        assert float(resid) <= 10 * UNIT[dtype] * 20 * float(torch.linalg.matrix_norm(Y.double()))
        assert torch.equal(R, R.triu())
    dup = torch.cat([U[:, :3], U[:, :3]], 1)  # exactly rank 3: the Cholesky breaks down
    Q, info = lk.orthonormalize(dup, return_info=True)
    assert info.fallback and "Cholesky" in info.reason
    Qh = lk.orthonormalize(U, method="householder")
    assert _orthonormality(Qh) <= 10 * UNIT[torch.float64] * 20


def test_operator_callbacks_match_the_dense_path():
    M, _ = _matrix(67, 45)
    calls = []

    def matmul(X):
        calls.append(X.shape)
        return M @ X

    op = lk.LinearOperator(tuple(M.shape), matmul, lambda Y: M.T @ Y, M.dtype, "cpu")
    Q_dense = lk.range_finder(M, 9, oversample=7, power_iters=1, seed=5)
    Q_op = lk.range_finder(op, 9, oversample=7, power_iters=1, seed=5, block_cols=8)
    # Ω materialized in column blocks of 8: ⌈16/8⌉ calls, then one per power iteration.
    assert calls == [(45, 8), (45, 8), (45, 16)]
    torch.testing.assert_close(Q_op, Q_dense, rtol=0, atol=1e-12)
    sym = M @ M.T  # symmetric: rmatmul may be omitted
    Q_sym = lk.range_finder(lk.LinearOperator((67, 67), sym.__matmul__, dtype=sym.dtype), 5,
                            power_iters=1)
    torch.testing.assert_close(Q_sym, lk.range_finder(sym, 5, power_iters=1), rtol=0, atol=1e-12)


def test_reproducible_for_a_seed():
    M, _ = _matrix(30, 20)
    M = M.float()
    a = lk.range_finder(M, 4, power_iters=2, seed=9)
    assert torch.equal(a, lk.range_finder(M, 4, power_iters=2, seed=9))
    assert not torch.equal(a, lk.range_finder(M, 4, power_iters=2, seed=10))


def test_bad_inputs_name_the_argument():
    M = torch.randn(6, 5)
    with pytest.raises(ValueError, match="M must be a 2-D tensor"):
        lk.range_finder(M[None], 2)
    with pytest.raises(TypeError, match="M must be float32 or float64"):
        lk.range_finder(M.half(), 2)
    with pytest.raises(TypeError, match="M must be a torch.Tensor or a LinearOperator"):
        lk.range_finder(M.numpy(), 2)
    with pytest.raises(ValueError, match="k must be a positive int"):
        lk.range_finder(M, 0)
    with pytest.raises(ValueError, match="oversample must be an int >= 0"):
        lk.range_finder(M, 2, oversample=-1)
    with pytest.raises(ValueError, match="power_iters must be an int >= 0"):
        lk.range_finder(M, 2, power_iters=-1)
    with pytest.raises(ValueError, match="dist must be 'gaussian' or 'rademacher'"):
        lk.range_finder(M, 2, dist="sparse")
    with pytest.raises(ValueError, match="seed must be an int"):
        lk.range_finder(M, 2, seed=-1)
    with pytest.raises(ValueError, match="ortho must be one of"):
        lk.range_finder(M, 2, ortho="gram_schmidt")
    with pytest.raises(ValueError, match="block_cols must be a positive multiple of 4"):
        lk.range_finder(M, 2, block_cols=6)
    with pytest.raises(ValueError, match="rmatmul .* is required for a non-square M"):
        lk.LinearOperator((6, 5), M.__matmul__)
    with pytest.raises(ValueError, match="Y must be tall"):
        lk.orthonormalize(M.T)
    with pytest.raises(ValueError, match="method must be one of"):
        lk.orthonormalize(M, method="mgs")


@pytest.mark.cuda
def test_gpu_matches_cpu_and_spends_no_memory_on_omega():
    """The same Ω on the GPU (Triton, generated in the GEMM) as on the CPU: a rank-10 M gives
    the same projector; and the sketch allocates far less than Ω's n × l floats."""
    g = torch.Generator().manual_seed(0)
    M = (torch.randn(256, 10, generator=g) @ torch.randn(10, 60000, generator=g)) / 100
    Mg = M.cuda()
    Q_cpu = lk.range_finder(M, 10, oversample=5, power_iters=1)
    Q_gpu = lk.range_finder(Mg, 10, oversample=5, power_iters=1, backend="triton").cpu()
    P_cpu, P_gpu = Q_cpu[:, :10] @ Q_cpu[:, :10].T, Q_gpu[:, :10] @ Q_gpu[:, :10].T
    assert float((P_cpu - P_gpu).abs().max()) <= 1e-4
    assert _error(M.double(), Q_gpu) <= 1e-5
    l = 64
    lk.sketch_matmul(Mg, l, 1, backend="triton")  # compile outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    Y = lk.sketch_matmul(Mg, l, 1, backend="triton")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    omega_bytes = Mg.shape[1] * l * 4
    assert extra <= omega_bytes / 2, (extra, omega_bytes)
    exact = M.double() @ lk.sketch_omega(torch.arange(60000), l, 1).double()
    assert float((Y.cpu().double() - exact).abs().max()) <= 1e-3 * float(exact.abs().max())
