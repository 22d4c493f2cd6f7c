"""subspace_project (c = Pᵀ g) and subspace_expand (w = base + P α) against float64."""
import pytest
import torch
from conftest import device_backend_params
from numerics import U32, assert_within, gamma

import lowrank_kernels as lk

SHAPES = [(1, 1), (7, 3), (131, 1), (257, 5), (1031, 67), (3001, 13)]  # (D, k)
U16 = 2.0 ** -11


def _inputs(D, k, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(D, k, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    v = torch.randn(D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    a = torch.randn(k, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return P, v, a


def _out_rounding(dtype):
    return {torch.float32: U32, torch.float16: U16, torch.float64: 0.0}[dtype]


@pytest.mark.parametrize("device,backend", device_backend_params("subspace_project"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_project_matches_float64(device, backend, dtype, shape):
    P, g, _ = _inputs(*shape, dtype, device)
    c = lk.subspace_project(P, g, backend=backend)
    assert c.dtype == torch.float32 and c.shape == (shape[1],)
    P64, g64 = P.double().cpu(), g.double().cpu()
    bound = gamma(shape[0] + 1) * (P64.abs().T @ g64.abs()) + 1e-30
    assert_within(c.cpu(), P64.T @ g64, bound, f"{backend} {dtype} {shape}")


@pytest.mark.parametrize("device,backend", device_backend_params("subspace_expand"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_base", [False, True], ids=["nobase", "base"])
def test_expand_matches_float64(device, backend, dtype, shape, with_base):
    P, base, a = _inputs(*shape, dtype, device)
    base = base if with_base else None
    w = lk.subspace_expand(P, a, base, backend=backend)
    assert w.dtype == dtype and w.shape == (shape[0],)
    P64, a64 = P.double().cpu(), a.double().cpu()
    exact, magnitude = P64 @ a64, P64.abs() @ a64.abs()
    if with_base:
        exact, magnitude = exact + base.double().cpu(), magnitude + base.double().cpu().abs()
    # fp32 accumulation of k products and the base, then one rounding to the output dtype.
    bound = (gamma(shape[1] + 2) * (1 + _out_rounding(dtype)) * magnitude
             + _out_rounding(dtype) * exact.abs() + 1e-30)
    assert_within(w.cpu(), exact, bound, f"{backend} {dtype} {shape}")


@pytest.mark.parametrize("device,backend", device_backend_params("subspace_project"))
def test_noncontiguous_and_mixed_dtypes(device, backend):
    P_t, g, a = _inputs(53, 211, torch.float32, device, seed=2)
    P = P_t.T[:, ::3]  # 211 × 18, column-major with a column stride of 3
    g = torch.randn(422, device=device)[::2]
    assert not P.is_contiguous() and not g.is_contiguous()
    c = lk.subspace_project(P, g.half(), backend=backend)
    P64, g64 = P.double().cpu(), g.half().double().cpu()
    assert_within(c.cpu(), P64.T @ g64, gamma(212) * (P64.abs().T @ g64.abs()), "project")
    alpha = torch.randn(P.shape[1], device=device, dtype=torch.float64)
    w = lk.subspace_expand(P, alpha.float(), g, backend=backend)
    exact = P64 @ alpha.float().double().cpu() + g.double().cpu()
    magnitude = P64.abs() @ alpha.float().double().cpu().abs() + g.double().cpu().abs()
    assert_within(w.cpu(), exact, gamma(20) * magnitude + U32 * exact.abs(), "expand")


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["project", "expand"])
def test_bf16_on_gpu(op):
    P, v, a = _inputs(4099, 33, torch.bfloat16, "cuda")
    P64, v64, a64 = P.double().cpu(), v.double().cpu(), a.double().cpu()
    if op == "project":
        c = lk.subspace_project(P, v, backend="triton")
        assert_within(c.cpu(), P64.T @ v64, gamma(4100) * (P64.abs().T @ v64.abs()), "bf16")
    else:
        w = lk.subspace_expand(P, a, v, backend="triton")
        exact = P64 @ a64 + v64
        bound = (gamma(35) + 2.0 ** -8) * (P64.abs() @ a64.abs() + v64.abs())
        assert_within(w.cpu(), exact, bound, "bf16")


def test_float64_reference_and_autograd():
    P, base, a = _inputs(23, 4, torch.float64, "cpu")
    a.requires_grad_(True)
    base.requires_grad_(True)
    torch.autograd.gradcheck(lambda a_, b_: lk.subspace_expand(P, a_, b_, backend="reference"),
                             (a, base))
    torch.autograd.gradcheck(lambda g_: lk.subspace_project(P, g_, backend="reference"),
                             (base,))
    torch.testing.assert_close(lk.subspace_project(P, base.detach()), P.T @ base.detach(),
                               rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("device,backend", device_backend_params("subspace_expand"))
def test_gradient_of_expand_is_the_projection(device, backend):
    """d/dα ⟨ḡ, base + P α⟩ = Pᵀ ḡ and d/dbase = ḡ, through the ops' autograd."""
    P, base, a = _inputs(301, 9, torch.float32, device, seed=5)
    cotangent = torch.randn(301, device=device)
    a.requires_grad_(True)
    base.requires_grad_(True)
    (lk.subspace_expand(P, a, base, backend=backend) * cotangent).sum().backward()
    P64, ct64 = P.double().cpu(), cotangent.double().cpu()
    assert_within(a.grad.cpu(), P64.T @ ct64, gamma(302) * (P64.abs().T @ ct64.abs()), "grad α")
    assert torch.equal(base.grad, cotangent)


def test_bad_input_errors_name_the_argument():
    P, g, a = _inputs(6, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"P must be a 2-D tensor"):
        lk.subspace_project(P[:, 0], g)
    with pytest.raises(ValueError, match=r"g must be a 1-D tensor"):
        lk.subspace_project(P, g[None])
    with pytest.raises(ValueError, match=r"P and g must have the same length D"):
        lk.subspace_project(P, g[:5])
    with pytest.raises(ValueError, match=r"P and alpha must have the same k"):
        lk.subspace_expand(P, a[:2])
    with pytest.raises(ValueError, match=r"P and base must have the same length D"):
        lk.subspace_expand(P, a, g[:4])
    with pytest.raises(TypeError, match=r"alpha must have a floating dtype"):
        lk.subspace_expand(P, a.long())
    with pytest.raises(TypeError, match=r"float64 inputs must all be float64"):
        lk.subspace_project(P.double(), g)
    with pytest.raises(ValueError, match=r"P must not require grad"):
        lk.subspace_expand(P.clone().requires_grad_(True), a)
    bad = g.clone()
    bad[1] = float("nan")
    with lk.strict(), pytest.raises(lk.NonFiniteError, match=r"g contains non-finite values"):
        lk.subspace_project(P, bad)


def test_torch_compile_fullgraph_traces_forward_and_backward():
    P, base, a = _inputs(41, 6, torch.float32, "cpu", seed=7)

    def loss(alpha):
        w = lk.subspace_expand(P, alpha, base)
        return (w * lk.fwht(w[:32])[0]).sum() + lk.subspace_project(P, w).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    x = a.clone().requires_grad_(True)
    y = a.clone().requires_grad_(True)
    torch.testing.assert_close(compiled(x), loss(y))
    compiled(x).backward()
    loss(y).backward()
    torch.testing.assert_close(x.grad, y.grad)
