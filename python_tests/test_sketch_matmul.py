"""sketch_matmul: Y = M Ω and Ωᵀ M with Ω generated in-kernel, against float64 products with
the materialized Ω (sketch_omega, itself checked bit for bit across backends), with the a
priori bound of an fp32 dot product: |Y − M Ω| ≤ γ_n |M| |Ω|. The in-kernel Ω is the
reference's bit for bit on the CPU (interpreter); compiled Triton's FMA contraction moves an
entry by ≤ 2 ulps (test_sketch_omega), which the bound adds on CUDA: + 2u |M| |Ω|."""
import pytest
import torch
from conftest import backends_for, device_backend_params
from numerics import U32, assert_within, gamma

import lowrank_kernels as lk


pytestmark = pytest.mark.usefixtures("one_thread")


SHAPES = [(1, 1, 1), (3, 5, 4), (67, 45, 13), (17, 130, 33), (130, 9, 70)]


def _omega(rows, k, seed, dist):
    return lk.sketch_omega(rows, k, seed, dist, backend="reference").double()


def _exact_and_bound(M, k, seed, dist, transpose, row_offset, u=U32):
    inner = M.shape[0] if transpose else M.shape[1]
    om = _omega(torch.arange(row_offset, row_offset + inner), k, seed, dist)
    M64 = M.double().cpu()
    g = gamma(inner, u) + (2 * u if M.is_cuda else 0.0)  # Ω's generator difference on CUDA
    if transpose:
        return om.T @ M64, g * (om.abs().T @ M64.abs()) + 1e-300
    return M64 @ om, g * (M64.abs() @ om.abs()) + 1e-300


@pytest.mark.parametrize("device,backend", device_backend_params("sketch_matmul"))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("transpose", [False, True], ids=["MOmega", "OmegaTM"])
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_matches_float64(device, backend, shape, transpose, dist):
    m, n, k = shape
    g = torch.Generator().manual_seed(m * n + k)
    M = torch.randn(m, n, generator=g).to(device)
    row_offset = 2 ** 33 + 5 if dist == "rademacher" else 0
    Y = lk.sketch_matmul(M, k, 42, dist, transpose, row_offset, backend=backend)
    assert Y.dtype == torch.float32
    assert Y.shape == ((k, n) if transpose else (m, k))
    exact, bound = _exact_and_bound(M, k, 42, dist, transpose, row_offset)
    assert_within(Y.cpu(), exact, bound, f"{backend} {shape} transpose={transpose}")


@pytest.mark.parametrize("device,backend", device_backend_params("sketch_matmul"))
def test_noncontiguous_and_fp16(device, backend):
    g = torch.Generator().manual_seed(5)
    big = torch.randn(40, 90, generator=g).to(device)
    M = big[::2, ::3]  # 20 × 30, both strides ≠ 1
    assert not M.is_contiguous()
    for X in (M, M.T, M.half()):
        Y = lk.sketch_matmul(X, 11, 7, backend=backend)
        exact, bound = _exact_and_bound(X, 11, 7, "gaussian", False, 0)
        assert_within(Y.cpu(), exact, bound, f"{backend} {X.dtype} strides {X.stride()}")


@pytest.mark.skipif("triton" not in backends_for("sketch_matmul", "cpu"),
                    reason="needs Triton (interpreter on CPU)")
@pytest.mark.parametrize("splits", [3, 7])
def test_triton_split_k(monkeypatch, splits):
    """Split-K (used on GPUs when Y has few tiles) forced on the interpreter: the partial sums
    over ranges of the inner dimension add up to M Ω within the same bound."""
    import lowrank_kernels.triton.sketch_matmul as triton_sketch_matmul
    monkeypatch.setattr(triton_sketch_matmul, "_splits", lambda *args: splits)
    M = torch.randn(19, 300, generator=torch.Generator().manual_seed(2))
    for transpose in (False, True):
        X = M.T if transpose else M
        Y = lk.sketch_matmul(X, 9, 3, transpose=transpose, row_offset=5, backend="triton")
        exact, bound = _exact_and_bound(X, 9, 3, "gaussian", transpose, 5)
        assert_within(Y, exact, bound, f"split-K {splits}")


def test_float64_reference():
    M = torch.randn(23, 19, dtype=torch.float64)
    Y = lk.sketch_matmul(M, 6, 3, backend="reference")
    assert Y.dtype == torch.float64
    exact, bound = _exact_and_bound(M, 6, 3, "gaussian", False, 0, u=2.0 ** -53)
    assert_within(Y, exact, bound, "float64 reference")


def test_row_offset_composes_blocks():
    """M Ω over all n rows = the sum over column blocks of M with row_offset (how the
    per-sample sketch uses it); Ωᵀ M likewise over row blocks."""
    M = torch.randn(9, 50, dtype=torch.float64)
    whole = lk.sketch_matmul(M, 8, 1, backend="reference")
    parts = sum(lk.sketch_matmul(M[:, a:a + 17], 8, 1, row_offset=a, backend="reference")
                for a in range(0, 50, 17))
    torch.testing.assert_close(parts, whole, rtol=1e-13, atol=1e-13)
    whole_t = lk.sketch_matmul(M.T, 8, 1, transpose=True, backend="reference")
    torch.testing.assert_close(whole_t, whole.T, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("device,backend", device_backend_params("sketch_matmul"))
def test_reproducible_for_a_seed(device, backend):
    M = torch.randn(31, 29).to(device)
    a = lk.sketch_matmul(M, 10, 123, backend=backend)
    assert torch.equal(a, lk.sketch_matmul(M, 10, 123, backend=backend))
    assert not torch.allclose(a, lk.sketch_matmul(M, 10, 124, backend=backend))


def test_no_memory_for_omega_is_needed_by_triton():
    """The Triton kernel takes no Ω argument: its only buffers are M and Y."""
    import inspect

    from lowrank_kernels.triton.sketch_matmul import _sketch_matmul_kernel
    params = list(inspect.signature(_sketch_matmul_kernel.fn).parameters)
    assert [p for p in params if p[0].isupper() and len(p) == 1] == ["M", "Y"]


def test_opcheck():
    M = torch.randn(6, 5)
    torch.library.opcheck(torch.ops.lowrank_kernels.sketch_matmul.default,
                          (M, 4, 1, "gaussian", True, 3))
    torch.library.opcheck(torch.ops.lowrank_kernels.sketch_matmul.default,
                          (M, 4, 1, "rademacher", False, 0))


def test_bad_inputs_name_the_argument():
    M = torch.randn(4, 3)
    with pytest.raises(ValueError, match="M must be a 2-D tensor"):
        lk.sketch_matmul(M[None], 2)
    with pytest.raises(TypeError, match="M must have a floating dtype"):
        lk.sketch_matmul(M.long(), 2)
    with pytest.raises(ValueError, match=r"k \(columns of Ω\) must be >= 1"):
        lk.sketch_matmul(M, 0)
    with pytest.raises(ValueError, match="seed must be in"):
        lk.sketch_matmul(M, 2, -1)
    with pytest.raises(ValueError, match="dist must be 'gaussian' or 'rademacher'"):
        lk.sketch_matmul(M, 2, 0, "normal")
    with pytest.raises(ValueError, match="row_offset must be >= 0"):
        lk.sketch_matmul(M, 2, 0, row_offset=-3)
    bad = M.clone()
    bad[1, 1] = float("nan")
    with lk.strict(), pytest.raises(lk.NonFiniteError, match="M contains non-finite values"):
        lk.sketch_matmul(bad, 2)
