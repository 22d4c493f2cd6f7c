"""fwht: y = H_n x against the dense Sylvester Hadamard matrix in float64."""
import pytest
import torch
from conftest import device_backend_params
from inputs import noncontiguous
from numerics import U32, U64, assert_within, gamma

import lowrank_kernels as lk


def hadamard(n):
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), H)
    return H


def _bound(x64, n, out_u):
    # log₂ n stages, each an fp32 add; then one rounding to the output dtype.
    m = max(n.bit_length() - 1, 1)
    magnitude = x64.abs().sum(-1, keepdim=True).expand(x64.shape)
    return (gamma(m) + out_u) * magnitude + 1e-30


@pytest.mark.parametrize("device,backend", device_backend_params("fwht"))
@pytest.mark.parametrize("n", [1, 2, 8, 64, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_matches_dense_hadamard(device, backend, n, dtype):
    x = torch.randn(3, 5, n, dtype=torch.float64).to(device=device, dtype=dtype)
    y = lk.fwht(x, backend=backend)
    assert y.shape == x.shape and y.dtype == dtype
    x64 = x.double().cpu()
    out_u = U32 if dtype == torch.float32 else 2.0 ** -11
    assert_within(y.cpu(), x64 @ hadamard(n).T, _bound(x64, n, out_u), f"{backend} n={n}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64],
                         ids=["fp32", "fp16", "fp64"])
@pytest.mark.parametrize("shape", [(3, 5, 1), (2, 2), (3, 5, 64), (2, 1024), (0, 8), (1, 4096),
                                   (3, 32), (2, 2048), (2, 16384)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cpu_kernel_is_the_reference_bit_for_bit(shape, dtype):
    """The C++ CPU kernel (radix-4 passes, a radix-2 one for odd log₂ n): the reference's
    butterflies in the same order, so equal to it bit for bit, never writing its input, and
    (n ≤ 4096) within the log₂ n-stage bound of the dense Hadamard product."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64).to(dtype)
    for x_ in (x, noncontiguous(x)):
        before = x_.clone()
        y = lk.fwht(x_, backend="native")
        assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
        assert torch.equal(y, lk.fwht(x_, backend="reference"))
        assert torch.equal(x_, before), "fwht must not write its input"
    n = shape[-1]
    if n > 4096:
        return  # the dense H_n (n² doubles) is too large; the reference's bits are checked
    x64 = x.double()
    out_u = {torch.float16: 2.0 ** -11, torch.float32: U32, torch.float64: U64}[dtype]
    m = max(n.bit_length() - 1, 1)
    bound = (gamma(m, U64 if dtype == torch.float64 else U32) + out_u) * \
        x64.abs().sum(-1, keepdim=True).expand(x64.shape)
    assert_within(y, x64 @ hadamard(n).T, bound + 1e-300, f"fwht {shape}")


def test_triton_long_transform_factors(monkeypatch):
    """n beyond one fiber: H_{ab} = (H_a ⊗ I_b)(I_a ⊗ H_b), strided second pass."""
    from lowrank_kernels.triton import fwht as triton_fwht

    monkeypatch.setattr(triton_fwht, "MAX_FIBER", 16)
    x = torch.randn(2, 1024, dtype=torch.float64).float()  # factors 16 · 16 · 4
    y = triton_fwht.fwht(x)
    x64 = x.double()
    assert_within(y, x64 @ hadamard(1024).T, _bound(x64, 1024, U32), "factored")


@pytest.mark.parametrize("device,backend", device_backend_params("fwht"))
def test_noncontiguous_input_and_involution(device, backend):
    x = torch.randn(64, 6, device=device).T  # 6 × 64, column-major
    y = lk.fwht(lk.fwht(x, backend=backend), backend=backend) / 64  # H H = n I
    x64 = x.double().cpu()
    assert_within(y.cpu(), x64, 2 * gamma(6) * x64.abs().sum(-1, keepdim=True).expand(6, 64)
                  + 1e-30, "H H x = n x")


@pytest.mark.cuda
def test_bf16_and_fiber_on_gpu():
    x = torch.randn(7, 16384, device="cuda").bfloat16()
    y = lk.fwht(x, backend="triton")
    x64 = x.double().cpu()
    exact = lk.fwht(x64, backend="reference")
    assert_within(y.cpu(), exact, _bound(x64, 16384, 2.0 ** -8), "bf16 n=16384")


def test_autograd_is_the_transform():
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: lk.fwht(t, backend="reference"), (x,))


def test_opcheck():
    x = torch.randn(4, 32)
    torch.library.opcheck(torch.ops.lowrank_kernels.fwht.default, (x,))
    with lk.use_backend("triton"):
        torch.library.opcheck(torch.ops.lowrank_kernels.fwht.default, (x,))


def test_bad_input_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"x's last dimension must be a power of two, got 12"):
        lk.fwht(torch.randn(3, 12))
    with pytest.raises(ValueError, match=r"x must have at least 1 dimension"):
        lk.fwht(torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"x must have a floating dtype"):
        lk.fwht(torch.ones(4, dtype=torch.int32))
