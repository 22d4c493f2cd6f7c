"""weighted_sum_conv2d: U c for a Conv2d (weight and bias parts) against float64 and torch.func,
for strided, padded, dilated and grouped convolutions."""
import pytest
import torch
from conftest import DEVICES, backends_for, device_backend_params
from layer_bounds import ROUNDING, check_result, exact_and_bound
from per_sample import CONV_CASES, conv_case, conv_case_id, conv_geometry, conv_inputs, split

import lowrank_kernels as lk
from lowrank_kernels.reference.weighted_sum_conv2d import weighted_sum_conv2d as reference


def _args(case):
    geo = conv_geometry(case)
    return (geo["kernel_size"], geo["stride"], geo["padding"], geo["dilation"], geo["groups"],
            geo["bias"])


def _expected(case, X, E, c):
    """n = B·H_out·W_out fp32 additions (and the splits'), plus the rounding of c ⊙ E."""
    tokens = E.shape[0] * E.shape[2] * E.shape[3]
    return exact_and_bound(reference, (X, E, c), _args(case), tokens + 8, ROUNDING[X.dtype])


def _coefficients(B, m, device, seed=0):
    g = torch.Generator().manual_seed(seed + 11)
    return torch.randn((B,) if m is None else (B, m), generator=g).to(device)


@pytest.mark.parametrize("device,backend", device_backend_params("weighted_sum_conv2d"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CONV_CASES, ids=conv_case_id)
@pytest.mark.parametrize("m", [None, 3], ids=["vector", "matrix"])
def test_matches_float64(device, backend, dtype, case, m):
    X, E = conv_inputs(case, dtype, device)
    c = _coefficients(case[0], m, device)
    result = lk.weighted_sum_conv2d(X, E, c, **conv_geometry(case), backend=backend)
    check_result(result, _expected(case, X, E, c), f"{backend} {dtype}")


@pytest.mark.cuda
def test_bf16_on_gpu():
    case = CONV_CASES[1]
    X, E = conv_inputs(case, torch.bfloat16, "cuda")
    c = _coefficients(case[0], 2, "cuda")
    result = lk.weighted_sum_conv2d(X, E, c, **conv_geometry(case), backend="triton")
    check_result(result, _expected(case, X, E, c), "triton bf16")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CONV_CASES[:2], ids=conv_case_id)
def test_equals_weighted_per_sample_gradients_of_nn_conv2d(device, case):
    B, C_in, C_out, hw, k, s, p, d, g, bias = case
    x, E, U = conv_case(B, C_in, C_out, hw, k, s, p, d, g, bias, device)
    weight_shape = (C_out, C_in // g, *k)
    Uw, Ub = split(U, C_out * C_in // g * k[0] * k[1])
    c = torch.randn(B, 2, dtype=torch.float64, device=device)
    scale = float(Uw.abs().max())
    for backend in backends_for("weighted_sum_conv2d", device, torch.float32):
        W, b = lk.weighted_sum_conv2d(x.float(), E.float(), c.float(), **conv_geometry(case),
                                      backend=backend)
        assert W.shape == (2, *weight_shape)
        torch.testing.assert_close(W.double(), (c.T @ Uw).view(2, *weight_shape), rtol=1e-5,
                                   atol=1e-6 * scale)
        if bias:
            torch.testing.assert_close(b.double(), c.T @ Ub, rtol=1e-5, atol=1e-6 * scale)
    W, b = lk.weighted_sum_conv2d(x, E, c[:, 0], **conv_geometry(case), backend="reference")
    torch.testing.assert_close(W, (c[:, 0] @ Uw).view(weight_shape), rtol=1e-12,
                               atol=1e-12 * scale)


@pytest.mark.parametrize("device,backend", device_backend_params("weighted_sum_conv2d"))
def test_channels_last_and_large_fp16_coefficients(device, backend):
    case = CONV_CASES[1]
    X, E = conv_inputs(case, torch.float16, device, seed=2)
    X = X.to(memory_format=torch.channels_last)
    c = _coefficients(case[0], None, device) * 1e6  # c ⊙ E would overflow fp16 unscaled
    result = lk.weighted_sum_conv2d(X, E, c, **conv_geometry(case), backend=backend)
    assert all(bool(torch.isfinite(r).all()) for r in result)
    check_result(result, _expected(case, X, E, c), f"{backend} channels_last")


def test_opcheck_and_compile():
    case = CONV_CASES[1]
    X, E = conv_inputs(case, torch.float32, "cpu")
    c = _coefficients(case[0], None, "cpu")
    op = torch.ops.lowrank_kernels.weighted_sum_conv2d.default
    geometry = [3, 2, 2, 1, 1, 0, 1, 2, 2]  # kernel, stride, padding, dilation, groups
    torch.library.opcheck(op, (X, E, c, geometry, True))
    torch.library.opcheck(op, (X, E, c[:, None], geometry))

    def f(x, e, w):
        W, b = lk.weighted_sum_conv2d(x, e, w, (3, 2), (2, 1), (1, 0), (1, 2), 2, True)
        return W.sum((1, 2, 3)) + b

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(X, E, c), f(X, E, c))


@pytest.mark.parametrize("backend", [None, "reference"])
def test_bad_input_errors_name_the_argument(backend):
    case = CONV_CASES[1]
    X, E = conv_inputs(case, torch.float32, "cpu")
    c = _coefficients(case[0], None, "cpu")
    geo = conv_geometry(case)
    with pytest.raises(ValueError, match=r"c and E must have the same batch size"):
        lk.weighted_sum_conv2d(X, E, c[:2], **geo, backend=backend)
    with pytest.raises(ValueError, match=r"E must be the gradient of the conv output"):
        lk.weighted_sum_conv2d(X, E[..., 1:], c, **geo, backend=backend)
    with pytest.raises(ValueError, match=r"dilation must be an int or a pair"):
        lk.weighted_sum_conv2d(X, E, c, **{**geo, "dilation": 0}, backend=backend)
    with pytest.raises(ValueError, match=r"X and E must have the same dtype"):
        lk.weighted_sum_conv2d(X, E.double(), c, **geo, backend=backend)
