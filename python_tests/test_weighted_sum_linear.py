"""weighted_sum_linear: U c = (c ⊙ E)ᵀ A (and the bias part) against float64 and torch.func."""
import pytest
import torch
from conftest import DEVICES, backends_for, device_backend_params
from layer_bounds import ROUNDING, check_result, exact_and_bound
from per_sample import linear_case, split

import lowrank_kernels as lk
from lowrank_kernels.reference.weighted_sum_linear import weighted_sum_linear as reference

# (B, T or None, d_in, d_out, m or None, bias)
CASES = [(1, None, 1, 1, None, True), (5, None, 7, 3, 3, False), (4, 3, 37, 33, None, True),
         (3, 5, 6, 70, 2, True)]


def _case_id(case):
    B, T, d_in, d_out, m, bias = case
    return f"B{B}-T{T}-{d_in}to{d_out}-m{m}" + ("-bias" if bias else "")


def _inputs(case, dtype, device, seed=0):
    B, T, d_in, d_out, m, bias = case
    g = torch.Generator().manual_seed(seed)
    lead = (B,) if T is None else (B, T)
    A = torch.randn(*lead, d_in, generator=g, dtype=torch.float64)
    E = torch.randn(*lead, d_out, generator=g, dtype=torch.float64)
    c = torch.randn((B,) if m is None else (B, m), generator=g, dtype=torch.float64)
    return A.to(device, dtype), E.to(device, dtype), c.to(device, torch.float32)


def _expected(A, E, c, bias):
    """Bounds with n = B·T fp32 additions (and the splits'), plus the rounding of c ⊙ E."""
    tokens = A.shape[0] * (A.shape[1] if A.dim() == 3 else 1)
    return exact_and_bound(reference, (A, E, c), (bias,), tokens + 8, ROUNDING[A.dtype])


@pytest.mark.parametrize("device,backend", device_backend_params("weighted_sum_linear"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_float64(device, backend, dtype, case):
    A, E, c = _inputs(case, dtype, device)
    result = lk.weighted_sum_linear(A, E, c, case[5], backend=backend)
    check_result(result, _expected(A, E, c, case[5]), f"{backend} {dtype}")


@pytest.mark.cuda
def test_bf16_on_gpu():
    A, E, c = _inputs((7, 33, 65, 47, 3, True), torch.bfloat16, "cuda")
    result = lk.weighted_sum_linear(A, E, c, True, backend="triton")
    check_result(result, _expected(A, E, c, True), "triton bf16")


@pytest.mark.parametrize("device,backend", device_backend_params("weighted_sum_linear"))
def test_large_coefficients_do_not_overflow_fp16(device, backend):
    """c up to 1e6 (1/λ of a small damping) with fp16 E: c ⊙ E would overflow fp16 (65504);
    the kernel scales c by a power of two first."""
    A, E, c = _inputs((6, 4, 9, 5, None, True), torch.float16, device)
    c = c * 1e6
    result = lk.weighted_sum_linear(A, E, c, True, backend=backend)
    assert all(bool(torch.isfinite(r).all()) for r in result)
    check_result(result, _expected(A, E, c, True), f"{backend} c ~ 1e6")


@pytest.mark.parametrize("device", DEVICES)
def test_equals_weighted_per_sample_gradients_of_nn_linear(device):
    x, E, U = linear_case(5, 4, 6, 3, True, device)
    Uw, Ub = split(U, 3 * 6)
    c = torch.randn(5, 2, dtype=torch.float64, device=device)
    for backend in backends_for("weighted_sum_linear", device, torch.float32):
        W, b = lk.weighted_sum_linear(x.float(), E.float(), c.float(), True, backend=backend)
        torch.testing.assert_close(W.double(), (c.T @ Uw).view(2, 3, 6), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.double(), c.T @ Ub, rtol=1e-5, atol=1e-6)
    W, b = lk.weighted_sum_linear(x, E, c[:, 0], True, backend="reference")
    torch.testing.assert_close(W, (c[:, 0] @ Uw).view(3, 6), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b, c[:, 0] @ Ub, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,backend", device_backend_params("weighted_sum_linear"))
def test_noncontiguous_inputs(device, backend):
    A, E, c = _inputs((5, 6, 14, 9, 4, True), torch.float32, device, seed=3)
    A = A[:, ::2, ::2]
    E = E.transpose(0, 1).contiguous().transpose(0, 1)[:, ::2]
    c = c.T.contiguous().T
    assert not A.is_contiguous() and not E.is_contiguous() and not c.is_contiguous()
    result = lk.weighted_sum_linear(A, E, c, True, backend=backend)
    check_result(result, _expected(A, E, c, True), f"{backend} strided")


def test_opcheck_and_compile():
    A, E, c = _inputs((4, 3, 5, 2, None, True), torch.float32, "cpu")
    op = torch.ops.lowrank_kernels.weighted_sum_linear.default
    torch.library.opcheck(op, (A, E, c, True))
    with lk.use_backend("reference"):
        torch.library.opcheck(op, (A, E, torch.stack([c, -c], 1)))

    def f(a, e, w):
        W, b = lk.weighted_sum_linear(a, e, w, True)
        return W.sum(1) + b

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(A, E, c), f(A, E, c))


@pytest.mark.parametrize("backend", [None, "reference"])
def test_bad_input_errors_name_the_argument(backend):
    A, E, c = _inputs((4, 3, 5, 2, None, True), torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"c and E must have the same batch size"):
        lk.weighted_sum_linear(A, E, c[:3], backend=backend)
    with pytest.raises(ValueError, match=r"c must be a 1 or 2-D tensor"):
        lk.weighted_sum_linear(A, E, c[:, None, None], backend=backend)
    with pytest.raises(TypeError, match=r"c must have a floating dtype"):
        lk.weighted_sum_linear(A, E, c.long(), backend=backend)
    with pytest.raises(ValueError, match=r"A and E must have the same token count"):
        lk.weighted_sum_linear(A, E[:, :2], c, backend=backend)
    with pytest.raises(ValueError, match=r"A and E must have the same dtype"):
        lk.weighted_sum_linear(A, E.half(), c, backend=backend)
    bad = c.clone()
    bad[1] = float("nan")
    with lk.strict(), pytest.raises(lk.NonFiniteError, match=r"c contains non-finite values"):
        lk.weighted_sum_linear(A, E, bad, backend=backend)


@pytest.mark.parametrize("device,backend", device_backend_params("weighted_sum_linear"))
@pytest.mark.parametrize("case", [(0, 3, 4, 5, 2, True), (3, 0, 4, 5, None, True),
                                  (3, 2, 0, 5, None, True), (3, 2, 4, 0, 2, True)],
                         ids=["B0", "T0", "d_in0", "d_out0"])
def test_empty_dimensions(device, backend, case):
    A, E, c = _inputs(case, torch.float32, device)
    check_result(lk.weighted_sum_linear(A, E, c, True, backend=backend),
                 _expected(A, E, c, True), f"{backend} {case}")
