"""project_conv2d: (Uᵀ V)_i = ⟨g_i, V⟩ for a Conv2d against float64 and torch.func, for strided,
padded, dilated and grouped convolutions."""
import pytest
import torch
from conftest import DEVICES, backends_for, device_backend_params
from layer_bounds import check_result, exact_and_bound
from per_sample import CONV_CASES, conv_case, conv_case_id, conv_geometry, conv_inputs, split

import lowrank_kernels as lk
from lowrank_kernels.reference.project_conv2d import project_conv2d as reference


def _geometry(case):
    """The op's keyword arguments (the kernel size is V's; no bias flag: V_bias says it)."""
    geo = conv_geometry(case)
    return dict(stride=geo["stride"], padding=geo["padding"], dilation=geo["dilation"],
                groups=geo["groups"])


def _directions(case, m, device, seed=0):
    B, C_in, C_out, hw, k, s, p, d, g, bias = case
    gen = torch.Generator().manual_seed(seed + 13)
    stack = () if m is None else (m,)
    V = torch.randn(*stack, C_out, C_in // g, *k, generator=gen).to(device)
    V_bias = torch.randn(*stack, C_out, generator=gen).to(device) if bias else None
    return V, V_bias


def _expected(case, X, E, V, V_bias):
    """n: the C_in/groups·kh·kw products of V ã, the bias term and the T·C_out token-sum terms."""
    geo = _geometry(case)
    args = (geo["stride"], geo["padding"], geo["dilation"], geo["groups"])
    d_in = V.shape[-3] * V.shape[-2] * V.shape[-1]
    n = d_in + 2 + E.shape[1] * E.shape[2] * E.shape[3] + 16
    return exact_and_bound(reference, (X, E, V, V_bias), args, n)


@pytest.mark.parametrize("device,backend", device_backend_params("project_conv2d"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CONV_CASES, ids=conv_case_id)
@pytest.mark.parametrize("m", [None, 2], ids=["one", "stack"])
def test_matches_float64(device, backend, dtype, case, m):
    X, E = conv_inputs(case, dtype, device)
    V, V_bias = _directions(case, m, device)
    P = lk.project_conv2d(X, E, V, V_bias, **_geometry(case), backend=backend)
    check_result(P, _expected(case, X, E, V, V_bias), f"{backend} {dtype}")


@pytest.mark.cuda
def test_bf16_on_gpu():
    case = CONV_CASES[1]
    X, E = conv_inputs(case, torch.bfloat16, "cuda")
    V, V_bias = _directions(case, 3, "cuda")
    P = lk.project_conv2d(X, E, V, V_bias, **_geometry(case), backend="triton")
    check_result(P, _expected(case, X, E, V, V_bias), "triton bf16")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CONV_CASES[:2], ids=conv_case_id)
def test_equals_per_sample_gradients_dotted_with_V(device, case):
    B, C_in, C_out, hw, k, s, p, d, g, bias = case
    x, E, U = conv_case(B, C_in, C_out, hw, k, s, p, d, g, bias, device)
    V, V_bias = _directions(case, 2, device)
    V, V_bias = V.double(), (V_bias.double() if bias else None)
    Uw, Ub = split(U, V[0].numel())
    exact = Uw @ V.flatten(1).T + (Ub @ V_bias.T if bias else 0.0)
    scale = float(exact.abs().max())
    for backend in backends_for("project_conv2d", device, torch.float32):
        P = lk.project_conv2d(x.float(), E.float(), V.float(),
                              None if V_bias is None else V_bias.float(), kernel_size=k,
                              **_geometry(case), backend=backend)
        torch.testing.assert_close(P.double(), exact, rtol=1e-5, atol=1e-6 * scale)
    P = lk.project_conv2d(x, E, V, V_bias, **_geometry(case), backend="reference")
    torch.testing.assert_close(P, exact, rtol=1e-12, atol=1e-12 * scale)


@pytest.mark.parametrize("device,backend", device_backend_params("project_conv2d"))
def test_channels_last_inputs(device, backend):
    case = CONV_CASES[1]
    X, E = conv_inputs(case, torch.float32, device, seed=2)
    X = X.to(memory_format=torch.channels_last)
    V, V_bias = _directions(case, None, device)
    V = V.to(memory_format=torch.channels_last)
    P = lk.project_conv2d(X, E, V, V_bias, **_geometry(case), backend=backend)
    check_result(P, _expected(case, X, E, V, V_bias), f"{backend} channels_last")


def test_opcheck_and_compile():
    case = CONV_CASES[1]
    X, E = conv_inputs(case, torch.float32, "cpu")
    V, V_bias = _directions(case, 2, "cpu")
    op = torch.ops.lowrank_kernels.project_conv2d.default
    geometry = [2, 1, 1, 0, 1, 2, 2]  # stride, padding, dilation, groups (the kernel is V's)
    torch.library.opcheck(op, (X, E, V, V_bias, geometry))
    torch.library.opcheck(op, (X, E, V[0], None, geometry))

    def f(x, e, v, vb):
        return lk.project_conv2d(x, e, v, vb, stride=(2, 1), padding=(1, 0), dilation=(1, 2),
                                 groups=2).sum(1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(X, E, V, V_bias), f(X, E, V, V_bias))


@pytest.mark.parametrize("backend", [None, "reference"])
def test_bad_input_errors_name_the_argument(backend):
    case = CONV_CASES[1]
    X, E = conv_inputs(case, torch.float32, "cpu")
    V, V_bias = _directions(case, None, "cpu")
    geo = _geometry(case)
    with pytest.raises(ValueError, match=r"V must be a 4 or 5-D tensor"):
        lk.project_conv2d(X, E, V[0], **geo, backend=backend)
    with pytest.raises(ValueError, match=r"V must have the weight's shape"):
        lk.project_conv2d(X, E, V[:, :1], **geo, backend=backend)
    with pytest.raises(ValueError, match=r"kernel_size \[3, 3\] must equal V's last two dims"):
        lk.project_conv2d(X, E, V, kernel_size=3, **geo, backend=backend)
    with pytest.raises(ValueError, match=r"V_bias must have shape \(6,\)"):
        lk.project_conv2d(X, E, V, V_bias[:4], **geo, backend=backend)
    with pytest.raises(ValueError, match=r"E must be the gradient of the conv output"):
        lk.project_conv2d(X, E, V, **{**geo, "stride": 1}, backend=backend)
