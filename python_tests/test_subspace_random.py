"""random_subspace_expand / _project: P = s·Ω generated in the kernel, against Ω materialized
by the sketch family's float64-checked reference (sketch_omega) and a dense float64 product."""
import pytest
import torch
from conftest import device_backend_params
from numerics import assert_within, gamma

import lowrank_kernels as lk

SHAPES = [(1, 1), (7, 3), (130, 5), (301, 67)]  # (D, d)


def _omega(D, d, seed, dist):
    return lk.sketch_omega(torch.arange(D), d, seed, dist, backend="reference").double()


@pytest.mark.parametrize("device,backend", device_backend_params("random_subspace_expand"))
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_base", [False, True], ids=["nobase", "base"])
def test_expand_matches_float64(device, backend, dist, shape, with_base):
    D, d = shape
    g = torch.Generator().manual_seed(1)
    alpha = torch.randn(d, generator=g).to(device)
    base = torch.randn(D, generator=g).to(device) if with_base else None
    scale = 0.37
    w = lk.random_subspace_expand(alpha, 11, D, scale, dist, base, backend=backend)
    assert w.shape == (D,) and w.dtype == torch.float32
    Om = _omega(D, d, 11, dist)
    a64 = alpha.double().cpu()
    exact, magnitude = scale * (Om @ a64), scale * (Om.abs() @ a64.abs())
    if with_base:
        exact, magnitude = exact + base.double().cpu(), magnitude + base.double().cpu().abs()
    # fp32 Ω entries are exact; d products, the scaling and the base: γ_{d+3}.
    assert_within(w.cpu(), exact, gamma(d + 3) * magnitude + 1e-30, f"{backend} {dist}")


@pytest.mark.parametrize("device,backend", device_backend_params("random_subspace_project"))
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_project_matches_float64(device, backend, dist, shape):
    D, d = shape
    v = torch.randn(2 * D, generator=torch.Generator().manual_seed(2)).to(device)[::2]
    c = lk.random_subspace_project(v, 5, d, 0.5, dist, backend=backend)
    assert c.shape == (d,) and c.dtype == torch.float32
    Om = _omega(D, d, 5, dist)
    v64 = v.double().cpu()
    assert_within(c.cpu(), 0.5 * (Om.T @ v64), gamma(D + 2) * 0.5 * (Om.abs().T @ v64.abs())
                  + 1e-30, f"{backend} {dist}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_expand_and_project_see_the_same_basis(backend):
    """⟨u, P α⟩ = ⟨Pᵀ u, α⟩: the two kernels generate one P; and autograd of expand is
    project (gradcheck in float64 on the reference)."""
    D, d = 97, 10
    alpha, u = torch.randn(d, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    lhs = u @ lk.random_subspace_expand(alpha.float(), 3, D, 0.1, backend=backend).double()
    rhs = lk.random_subspace_project(u.float(), 3, d, 0.1, backend=backend).double() @ alpha
    assert abs(float(lhs - rhs)) <= 2 * gamma(D + d) * 0.1 * 6.7 * float(
        u.abs().sum() * alpha.abs().sum())
    a = alpha.clone().requires_grad_(True)
    b = u.clone().requires_grad_(True)
    torch.autograd.gradcheck(lambda a_, b_: lk.random_subspace_expand(
        a_, 3, D, 0.1, "gaussian", b_, backend="reference"), (a, b))
    torch.autograd.gradcheck(lambda b_: lk.random_subspace_project(
        b_, 3, d, 0.1, backend="reference"), (b,))


@pytest.mark.cuda
def test_gpu_large_column_count():
    alpha = torch.randn(1000, device="cuda")
    w = lk.random_subspace_expand(alpha, 9, 4099, 0.01, backend="triton")
    Om = _omega(4099, 1000, 9, "gaussian")
    a64 = alpha.double().cpu()
    assert_within(w.cpu(), 0.01 * (Om @ a64), gamma(1003) * 0.01 * (Om.abs() @ a64.abs()), "gpu")
    c = lk.random_subspace_project(w, 9, 1000, 0.01, backend="triton")
    w64 = w.double().cpu()
    assert_within(c.cpu(), 0.01 * (Om.T @ w64), gamma(4101) * 0.01 * (Om.abs().T @ w64.abs()),
                  "gpu project")


def test_bad_input_errors_name_the_argument():
    a, v = torch.randn(6), torch.randn(33)
    with pytest.raises(ValueError, match=r"D and base must have the same length"):
        lk.random_subspace_expand(a, 1, 32, 1.0, base=v)
    with pytest.raises(ValueError, match=r"alpha must be a 1-D tensor"):
        lk.random_subspace_expand(a[None], 1, 33, 1.0)
    with pytest.raises(ValueError, match=r"seed must be in"):
        lk.random_subspace_project(v, -1, 6, 1.0)
    with pytest.raises(ValueError, match=r"dist must be 'gaussian' or 'rademacher'"):
        lk.random_subspace_project(v, 1, 6, 1.0, "uniform")
    with pytest.raises(ValueError, match=r"d must be >= 0"):
        lk.random_subspace_project(v, 1, -2, 1.0)
    with pytest.raises(TypeError, match=r"float64 inputs must all be float64"):
        lk.random_subspace_expand(a.double(), 1, 33, 1.0, base=v)
