"""gram_conv2d: K_ij = ⟨g_i, g_j⟩ of a Conv2d's per-sample gradients against float64 and
torch.func, for strided, padded, dilated and grouped convolutions, by both routes."""
import pytest
import torch
from conftest import DEVICES, backends_for, device_backend_params
from numerics import assert_within, gamma
from per_sample import CONV_CASES, conv_case, conv_case_id, conv_geometry, conv_inputs

import lowrank_kernels as lk
from lowrank_kernels.reference.gram_conv2d import gram_conv2d as reference_gram_conv2d

ROUTES = ["token_pair", "per_sample"]


def _exact_and_bound(case, X, E, X2=None, E2=None, diagonal=False):
    """float64 K of the rounded inputs and γ_n M, M the same Gram of |X|, |E| (im2col of |X| is
    |im2col X|): it bounds |Σ_{t,s} (ã·ã')(e·e')| by either route."""
    geo = conv_geometry(case)
    args = (geo["kernel_size"], geo["stride"], geo["padding"], geo["dilation"], geo["groups"],
            geo["bias"])

    def f64(t):
        return None if t is None else t.double().cpu()

    X, E, X2, E2 = map(f64, (X, E, X2, E2))
    exact = reference_gram_conv2d(X, E, *args, X2, E2, diagonal)
    magnitude = reference_gram_conv2d(X.abs(), E.abs(), *args,
                                      None if X2 is None else X2.abs(),
                                      None if E2 is None else E2.abs(), diagonal)
    d_in = X.shape[1] // geo["groups"] * geo["kernel_size"][0] * geo["kernel_size"][1]
    d_out, T = E.shape[1] // geo["groups"], E.shape[2] * E.shape[3]
    n = (d_in + 1) + d_out + geo["groups"] * T * T + T + E.shape[1] * (d_in + 1) + 64
    return exact, gamma(n) * magnitude + 1e-30


@pytest.mark.parametrize("device,backend", device_backend_params("gram_conv2d"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CONV_CASES, ids=conv_case_id)
def test_matches_float64(device, backend, dtype, case):
    X, E = conv_inputs(case, dtype, device)
    X2, E2 = conv_inputs(case, dtype, device, seed=1, batch=2)
    K = lk.gram_conv2d(X, E, **conv_geometry(case), backend=backend)
    assert K.dtype == torch.float32 and K.shape == (case[0], case[0])
    assert torch.equal(K, K.T), "K must be exactly symmetric"
    assert_within(K.cpu(), *_exact_and_bound(case, X, E), f"{backend} K")
    d = lk.gram_conv2d(X, E, **conv_geometry(case), diagonal=True, backend=backend)
    assert_within(d.cpu(), *_exact_and_bound(case, X, E, diagonal=True), f"{backend} diag")
    C = lk.gram_conv2d(X, E, **conv_geometry(case), X2=X2, E2=E2, backend=backend)
    assert C.shape == (case[0], 2)
    assert_within(C.cpu(), *_exact_and_bound(case, X, E, X2, E2), f"{backend} cross")
    X3, E3 = conv_inputs(case, dtype, device, seed=2)
    c = lk.gram_conv2d(X, E, **conv_geometry(case), X2=X3, E2=E3, diagonal=True,
                       backend=backend)
    assert_within(c.cpu(), *_exact_and_bound(case, X, E, X3, E3, diagonal=True),
                  f"{backend} cross diagonal")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", CONV_CASES[1:3], ids=conv_case_id)
def test_both_routes_of_every_backend(device, route, case):
    """The route the op does not pick for these shapes, forced through each backend."""
    from lowrank_kernels.triton.gram_conv2d import gram_conv2d as triton_gram_conv2d

    X, E = conv_inputs(case, torch.float32, device)
    geo = conv_geometry(case)
    args = (geo["kernel_size"], geo["stride"], geo["padding"], geo["dilation"], geo["groups"],
            geo["bias"])
    exact, bound = _exact_and_bound(case, X, E)
    runs = {"reference": reference_gram_conv2d}
    if "triton" in backends_for("gram_conv2d", device):
        runs["triton"] = triton_gram_conv2d
    for name, run in runs.items():
        K = run(X, E, *args, route=route)
        assert_within(K.cpu(), exact, bound, f"{name} {route}")
        d = run(X, E, *args, diagonal=True, route=route)
        assert_within(d.cpu(), exact.diag(), bound.diag(), f"{name} {route} diagonal")
    X2, E2 = conv_inputs(case, torch.float32, device, seed=1)
    exact, bound = _exact_and_bound(case, X, E, X2, E2)
    for name, run in runs.items():
        d = run(X, E, *args, X2, E2, diagonal=True, route=route)
        assert_within(d.cpu(), exact.diag(), bound.diag(), f"{name} {route} cross diagonal")


@pytest.mark.cuda
def test_bf16_on_gpu():
    case = CONV_CASES[1]
    X, E = conv_inputs(case, torch.bfloat16, "cuda")
    K = lk.gram_conv2d(X, E, **conv_geometry(case), backend="triton")
    assert_within(K.cpu(), *_exact_and_bound(case, X, E), "triton bf16")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CONV_CASES[:2], ids=conv_case_id)
def test_equals_per_sample_gradients_of_nn_conv2d(device, case):
    B, C_in, C_out, hw, k, s, p, d, g, bias = case
    x, E, U = conv_case(B, C_in, C_out, hw, k, s, p, d, g, bias, device)
    x2, E2, U2 = conv_case(2, C_in, C_out, hw, k, s, p, d, g, bias, device, seed=5)
    geo = conv_geometry(case)
    scale = float((U @ U.T).abs().max())
    for backend in backends_for("gram_conv2d", device, torch.float32):
        K = lk.gram_conv2d(x.float(), E.float(), **geo, backend=backend)
        torch.testing.assert_close(K.double(), U @ U.T, rtol=1e-5, atol=1e-6 * scale)
        C = lk.gram_conv2d(x.float(), E.float(), **geo, X2=x2.float(), E2=E2.float(),
                           backend=backend)
        torch.testing.assert_close(C.double(), U @ U2.T, rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(lk.gram_conv2d(x, E, **geo, backend="reference"), U @ U.T,
                               rtol=1e-12, atol=1e-12 * scale)
    torch.testing.assert_close(lk.gram_conv2d(x, E, **geo, diagonal=True, backend="reference"),
                               (U * U).sum(1), rtol=1e-12, atol=1e-12 * scale)


@pytest.mark.parametrize("device,backend", device_backend_params("gram_conv2d"))
def test_channels_last_and_noncontiguous(device, backend):
    case = CONV_CASES[1]
    X, E = conv_inputs(case, torch.float32, device, seed=2)
    X = X.to(memory_format=torch.channels_last)
    E = E.transpose(2, 3).contiguous().transpose(2, 3)
    assert not X.is_contiguous() and not E.is_contiguous()
    K = lk.gram_conv2d(X, E, **conv_geometry(case), backend=backend)
    assert_within(K.cpu(), *_exact_and_bound(case, X, E), f"{backend} channels_last")


def test_opcheck_and_compile():
    case = CONV_CASES[1]
    X, E = conv_inputs(case, torch.float32, "cpu")
    op = torch.ops.lowrank_kernels.gram_conv2d.default
    args = (X, E, [3, 2, 2, 1, 1, 0, 1, 2, 2], True)  # kernel, stride, padding, dilation, groups
    torch.library.opcheck(op, args)
    torch.library.opcheck(op, args, {"diagonal": True})
    torch.library.opcheck(op, args, {"X2": X[:2], "E2": E[:2]})

    def f(x, e):
        return lk.gram_conv2d(x, e, (3, 2), (2, 1), (1, 0), (1, 2), 2, True).sum(0)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(X, E), f(X, E))


@pytest.mark.parametrize("backend", [None, "reference"])
def test_bad_input_errors_name_the_argument(backend):
    case = CONV_CASES[1]
    X, E = conv_inputs(case, torch.float32, "cpu")
    geo = conv_geometry(case)
    with pytest.raises(ValueError, match=r"X must be a 4-D tensor"):
        lk.gram_conv2d(X[0], E, **geo, backend=backend)
    with pytest.raises(ValueError, match=r"E must be a 4-D tensor"):
        lk.gram_conv2d(X, E[:, 0], **geo, backend=backend)
    with pytest.raises(ValueError, match=r"X and E must have the same batch size"):
        lk.gram_conv2d(X, E[:2], **geo, backend=backend)
    with pytest.raises(ValueError, match=r"E must be the gradient of the conv output"):
        lk.gram_conv2d(X, E[:, :, 1:], **geo, backend=backend)
    with pytest.raises(ValueError, match=r"groups must be a positive int dividing"):
        lk.gram_conv2d(X, E, **{**geo, "groups": 3}, backend=backend)
    with pytest.raises(ValueError, match=r"kernel_size must be an int or a pair"):
        lk.gram_conv2d(X, E, **{**geo, "kernel_size": (3, 0)}, backend=backend)
    with pytest.raises(ValueError, match=r"padding must be an int or a pair"):
        lk.gram_conv2d(X, E, **{**geo, "padding": -1}, backend=backend)
    with pytest.raises(TypeError, match=r"X must have a floating dtype"):
        lk.gram_conv2d(X.long(), E, **geo, backend=backend)
    with pytest.raises(ValueError, match=r"X2 and E2 must be given together"):
        lk.gram_conv2d(X, E, **geo, E2=E, backend=backend)
    with pytest.raises(ValueError, match=r"X2 must have the first batch's shape"):
        lk.gram_conv2d(X, E, **geo, X2=X[:, :, 1:], E2=E, backend=backend)
    bad = E.clone()
    bad[0, 1, 0, 0] = float("inf")
    with lk.strict(), pytest.raises(lk.NonFiniteError, match=r"E contains non-finite values"):
        lk.gram_conv2d(X, bad, **geo, backend=backend)
