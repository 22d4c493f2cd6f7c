"""project_linear: (Uᵀ V)_i = Σ_t e_itᵀ V a_it (+ the bias part) against float64 and torch.func."""
import pytest
import torch
from conftest import DEVICES, backends_for, device_backend_params
from layer_bounds import check_result, exact_and_bound
from per_sample import linear_case, split

import lowrank_kernels as lk
from lowrank_kernels.reference.project_linear import project_linear as reference

# (B, T or None, d_in, d_out, m or None, with V_bias)
CASES = [(1, None, 1, 1, None, True), (5, None, 7, 3, 3, False), (4, 3, 37, 33, None, True),
         (3, 5, 6, 70, 2, True)]


def _case_id(case):
    B, T, d_in, d_out, m, vb = case
    return f"B{B}-T{T}-{d_in}to{d_out}-m{m}" + ("-Vbias" if vb else "")


def _inputs(case, dtype, device, seed=0):
    B, T, d_in, d_out, m, vb = case
    g = torch.Generator().manual_seed(seed)
    lead = (B,) if T is None else (B, T)
    stack = () if m is None else (m,)
    A = torch.randn(*lead, d_in, generator=g, dtype=torch.float64).to(device, dtype)
    E = torch.randn(*lead, d_out, generator=g, dtype=torch.float64).to(device, dtype)
    V = torch.randn(*stack, d_out, d_in, generator=g).to(device)
    V_bias = torch.randn(*stack, d_out, generator=g).to(device) if vb else None
    return A, E, V, V_bias


def _expected(A, E, V, V_bias):
    """n: the d_in products of V a, the bias term, and the T·d_out terms of the token sum."""
    T = A.shape[1] if A.dim() == 3 else 1
    n = A.shape[-1] + 2 + T * E.shape[-1] + 16
    return exact_and_bound(reference, (A, E, V, V_bias), (), n)


@pytest.mark.parametrize("device,backend", device_backend_params("project_linear"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_float64(device, backend, dtype, case):
    A, E, V, V_bias = _inputs(case, dtype, device)
    P = lk.project_linear(A, E, V, V_bias, backend=backend)
    check_result(P, _expected(A, E, V, V_bias), f"{backend} {dtype}")


@pytest.mark.cuda
def test_bf16_on_gpu():
    A, E, V, V_bias = _inputs((7, 33, 65, 47, 3, True), torch.bfloat16, "cuda")
    P = lk.project_linear(A, E, V, V_bias, backend="triton")
    check_result(P, _expected(A, E, V, V_bias), "triton bf16")


@pytest.mark.parametrize("device", DEVICES)
def test_equals_per_sample_gradients_dotted_with_V(device):
    x, E, U = linear_case(5, 4, 6, 3, True, device)
    Uw, Ub = split(U, 3 * 6)
    V = torch.randn(2, 3, 6, dtype=torch.float64, device=device)
    Vb = torch.randn(2, 3, dtype=torch.float64, device=device)
    exact = Uw @ V.flatten(1).T + Ub @ Vb.T
    for backend in backends_for("project_linear", device, torch.float32):
        P = lk.project_linear(x.float(), E.float(), V.float(), Vb.float(), backend=backend)
        torch.testing.assert_close(P.double(), exact, rtol=1e-5, atol=1e-6)
        P = lk.project_linear(x.float(), E.float(), V[0].float(), backend=backend)
        torch.testing.assert_close(P.double(), Uw @ V[0].flatten(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lk.project_linear(x, E, V, Vb, backend="reference"), exact,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,backend", device_backend_params("project_linear"))
def test_noncontiguous_inputs(device, backend):
    A, E, V, V_bias = _inputs((5, 6, 14, 9, 2, True), torch.float32, device, seed=3)
    A = A[:, ::2, ::2]
    E = E.transpose(0, 1).contiguous().transpose(0, 1)[:, ::2]
    V = V[:, :, ::2].transpose(1, 2).contiguous().transpose(1, 2)
    V_bias = V_bias.T.contiguous().T
    assert not any(t.is_contiguous() for t in (A, E, V, V_bias))
    P = lk.project_linear(A, E, V, V_bias, backend=backend)
    check_result(P, _expected(A, E, V, V_bias), f"{backend} strided")


def test_opcheck_and_compile():
    A, E, V, V_bias = _inputs((4, 3, 5, 2, 2, True), torch.float32, "cpu")
    op = torch.ops.lowrank_kernels.project_linear.default
    torch.library.opcheck(op, (A, E, V, V_bias))
    with lk.use_backend("reference"):
        torch.library.opcheck(op, (A, E, V[0]))

    def f(a, e, v, vb):
        return lk.project_linear(a, e, v, vb).sum(1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(A, E, V, V_bias), f(A, E, V, V_bias))


@pytest.mark.parametrize("backend", [None, "reference"])
def test_bad_input_errors_name_the_argument(backend):
    A, E, V, V_bias = _inputs((4, 3, 5, 2, 2, True), torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"V must have the weight's shape \(2, 5\)"):
        lk.project_linear(A, E, V[:, :, :4], backend=backend)
    with pytest.raises(ValueError, match=r"V must be a 2 or 3-D tensor"):
        lk.project_linear(A, E, V[None], backend=backend)
    with pytest.raises(ValueError, match=r"V_bias must have shape \(2, 2\)"):
        lk.project_linear(A, E, V, V_bias[:1], backend=backend)
    with pytest.raises(ValueError, match=r"V_bias must be a 1-D tensor"):
        lk.project_linear(A, E, V[0], V_bias, backend=backend)
    with pytest.raises(TypeError, match=r"V must have a floating dtype"):
        lk.project_linear(A, E, V.long(), backend=backend)
    with pytest.raises(ValueError, match=r"A and E must have the same batch size"):
        lk.project_linear(A, E[:3], V, backend=backend)
    bad = V.clone()
    bad[0, 1, 2] = float("inf")
    with lk.strict(), pytest.raises(lk.NonFiniteError, match=r"V contains non-finite values"):
        lk.project_linear(A, E, bad, backend=backend)


@pytest.mark.parametrize("device,backend", device_backend_params("project_linear"))
@pytest.mark.parametrize("case", [(0, 3, 4, 5, 2, True), (3, 0, 4, 5, None, True),
                                  (3, 2, 0, 5, None, True), (3, 2, 4, 0, 2, True)],
                         ids=["B0", "T0", "d_in0", "d_out0"])
def test_empty_dimensions(device, backend, case):
    A, E, V, V_bias = _inputs(case, torch.float32, device)
    check_result(lk.project_linear(A, E, V, V_bias, backend=backend),
                 _expected(A, E, V, V_bias), f"{backend} {case}")
