"""randomized_svd / randomized_eigh against torch.linalg.svd / eigh (float64) on matrices with
a decaying spectrum, and the torch.svd_lowrank argument mapping (q, niter).

Bounds used (exact arithmetic, plus a rounding term): with Q the range finder's basis and
ε = ‖M − QQᵀM‖₂, the computed singular values S_i are those of QᵀM, so
0 ≤ σ_i − S_i ≤ ε (interlacing and Weyl), and the rank-k truncation satisfies
‖M − U diag(S) Vᵀ‖₂ ≤ σ_{k+1} + ε (HMT §9.4)."""
import pytest
import torch
from numerics import U64

import lowrank_kernels as lk


pytestmark = pytest.mark.usefixtures("one_thread")


def _matrix(m, n, decay, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    sigma = decay ** torch.arange(r, dtype=torch.float64)
    return (U * sigma) @ V.T, sigma


def _eye_error(X):
    return float(torch.linalg.matrix_norm(X.T @ X - torch.eye(X.shape[1], dtype=X.dtype)))


@pytest.mark.parametrize("shape", [(67, 45), (45, 67), (30, 30)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("power_iters", [0, 2])
def test_matches_torch_linalg_svd(shape, power_iters):
    M, sigma = _matrix(*shape, decay=0.7)
    k = 7
    U, S, V, stats = lk.randomized_svd(M, k, power_iters=power_iters, seed=2,
                                       return_stats=True)
    assert U.shape == (shape[0], k) and S.shape == (k,) and V.shape == (shape[1], k)
    Q = lk.range_finder(M, k, power_iters=power_iters, seed=2)
    eps = float(torch.linalg.matrix_norm(M - Q @ (Q.T @ M), 2))
    rounding = 100 * U64 * max(shape)
    exact = torch.linalg.svdvals(M)[:k]
    assert torch.all(S <= exact + rounding) and torch.all(exact - S <= eps + rounding)
    assert torch.all(S[:-1] >= S[1:])
    assert _eye_error(U) <= rounding and _eye_error(V) <= rounding
    err = float(torch.linalg.matrix_norm(M - (U * S) @ V.T, 2))
    assert err <= float(sigma[k]) + eps + rounding
    # Leading singular vectors (gaps of 30%): aligned with the exact ones up to ε/gap.
    Ue, _, Vhe = torch.linalg.svd(M, full_matrices=False)
    gap = float(sigma[k - 1] - sigma[k])
    assert float((1 - (Ue[:, :k] * U).sum(0).abs()).max()) <= (eps / gap) ** 2 * 4 + rounding
    assert float((1 - (Vhe[:k].T * V).sum(0).abs()).max()) <= (eps / gap) ** 2 * 4 + rounding


def test_float32_and_operator_input():
    M, sigma = _matrix(67, 45, decay=0.6)
    k = 6
    U, S, V = lk.randomized_svd(M.float(), k, power_iters=1)
    assert U.dtype == torch.float32
    exact = sigma[:k]
    assert float(((S.double() - exact).abs() / exact).max()) <= 1e-4
    op = lk.LinearOperator(tuple(M.shape), M.__matmul__, lambda Y: M.T @ Y, M.dtype)
    U2, S2, V2 = lk.randomized_svd(op, k, power_iters=1)
    U3, S3, V3 = lk.randomized_svd(M, k, power_iters=1)
    torch.testing.assert_close(S2, S3, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close((U2 * S2) @ V2.T, (U3 * S3) @ V3.T, rtol=0, atol=1e-12)


def test_drop_in_for_torch_svd_lowrank():
    """randomized_svd(A, q=..., niter=...) returns what torch.svd_lowrank(A, q, niter) does:
    q triplets from a q-column sketch with niter power iterations."""
    M, sigma = _matrix(60, 40, decay=0.5)
    M5 = M - torch.linalg.svd(M)[0][:, 5:] @ (torch.linalg.svd(M)[0][:, 5:].T @ M)  # rank 5
    U, S, V = lk.randomized_svd(M5, q=6, niter=2)
    Ut, St, Vt = torch.svd_lowrank(M5, q=6, niter=2)
    assert U.shape == Ut.shape and S.shape == St.shape and V.shape == Vt.shape
    # A rank-5 matrix is captured exactly by a 6-column sketch: both give its spectrum.
    torch.testing.assert_close(S[:5], sigma[:5], rtol=1e-12, atol=0)
    torch.testing.assert_close(St[:5], sigma[:5], rtol=1e-12, atol=0)
    assert float(S[5]) <= 1e-14 and float(St[5]) <= 1e-14
    torch.testing.assert_close((U * S) @ V.T, M5, rtol=0, atol=1e-14)
    # niter and power_iters are the same knob.
    a = lk.randomized_svd(M, q=6, niter=1, seed=4)[1]
    torch.testing.assert_close(a, lk.randomized_svd(M, q=6, power_iters=1, seed=4)[1],
                               rtol=0, atol=0)


def test_randomized_eigh_matches_eigh():
    M, sigma = _matrix(50, 50, decay=0.75)
    P = M @ M.T  # PSD, eigenvalues σ²
    k = 6
    evals, evecs, stats = lk.randomized_eigh(P, k, return_stats=True)
    exact = torch.linalg.eigvalsh(P).flip(0)[:k]
    Q = lk.range_finder(P, k, power_iters=2)
    eps = float(torch.linalg.matrix_norm(P - Q @ (Q.T @ P), 2))
    rounding = 100 * U64 * 50
    assert torch.all(evals <= exact + rounding) and torch.all(exact - evals <= eps + rounding)
    assert _eye_error(evecs) <= rounding
    resid = torch.linalg.vector_norm(P @ evecs - evecs * evals, dim=0)
    assert float(resid.max()) <= 2 * eps ** 0.5 * float(exact[0]) ** 0.5 + rounding
    op = lk.LinearOperator((50, 50), P.__matmul__, dtype=P.dtype)
    ev2, _ = lk.randomized_eigh(op, k, niter=2)
    torch.testing.assert_close(ev2, evals, rtol=1e-12, atol=1e-14)


def test_bad_inputs_name_the_argument():
    M = torch.randn(8, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="give exactly one of k .* or q"):
        lk.randomized_svd(M, 3, q=5)
    with pytest.raises(ValueError, match="give exactly one of k .* or q"):
        lk.randomized_svd(M)
    with pytest.raises(ValueError, match="q must be a positive int"):
        lk.randomized_svd(M, q=0)
    with pytest.raises(ValueError, match="niter and power_iters are the same thing"):
        lk.randomized_svd(M, 3, niter=1, power_iters=2)
    with pytest.raises(ValueError, match="randomized_eigh: niter and power_iters"):
        lk.randomized_eigh(M @ M.T, 2, niter=1, power_iters=3)
    with pytest.raises(ValueError, match="randomized_eigh: M must be square"):
        lk.randomized_eigh(M, 2)
    with pytest.raises(ValueError, match="M must be a 2-D tensor"):
        lk.randomized_svd(M[None], 2)
