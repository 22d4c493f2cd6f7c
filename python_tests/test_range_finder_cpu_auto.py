"""range_finder's CPU default (ortho='auto'): Householder QR for the returned basis, one
Cholesky-QR pass between power iterations while κ(Y)² u ≤ 1/100 (else Householder), the
products as wide transposes. Against float64 and against Householder throughout."""
import pytest
import torch

import lowrank_kernels as lk

pytestmark = pytest.mark.usefixtures("one_thread")


def _matrix(m, n, decay, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return (U * decay ** torch.arange(r, dtype=torch.float64)) @ V.T


def _error(M, Q):
    Q = Q.double()
    return float(torch.linalg.matrix_norm(M - Q @ (Q.T @ M)) / torch.linalg.matrix_norm(M))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_auto_matches_householder_throughout(dtype):
    M = _matrix(300, 200, 0.98)
    for q in (1, 2):
        Q, stats = lk.range_finder(M.to(dtype), 20, power_iters=q, return_stats=True)
        methods = [i.method for i in stats.orthonormalizations]
        assert methods == ["cholqr"] * (2 * q) + ["householder"]
        Qh = lk.range_finder(M.to(dtype), 20, power_iters=q, ortho="householder")
        u = torch.finfo(dtype).eps
        assert float(torch.linalg.matrix_norm(Q.double().T @ Q.double() - torch.eye(30,
                     dtype=torch.float64))) <= 10 * u * 30
        assert abs(_error(M, Q) - _error(M, Qh)) <= 1e-4 * _error(M, Qh) + 100 * u


def test_ill_conditioned_power_step_takes_householder():
    """σ_j = 0.5^j: κ(Y) ≈ 2^29 for 30 columns, κ² u ≫ 1/100 in float32: no Cholesky pass."""
    M = _matrix(120, 90, 0.5)
    Q, stats = lk.range_finder(M.float(), 20, power_iters=1, return_stats=True)
    assert all(i.method == "householder" for i in stats.orthonormalizations)
    assert _error(M, Q) <= 1e-5
