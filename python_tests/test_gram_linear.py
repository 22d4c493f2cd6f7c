"""gram_linear: K = (A Aᵀ + b) ⊙ (E Eᵀ) against float64 and torch.func per-sample gradients."""
import pytest
import torch
from conftest import DEVICES, backends_for, device_backend_params
from numerics import U32, assert_within, gamma

import lowrank_kernels as lk
from lowrank_kernels._registry import BackendUnavailableError

SHAPES = [(1, 1, 1), (1, 7, 3), (2, 3, 5), (13, 17, 11), (67, 31, 29), (131, 5, 257)]


def _inputs(B, d_in, d_out, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, d_in, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    E = torch.randn(B, d_out, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return A, E


def _exact_and_bound(A, E, bias):
    """float64 K of the (already rounded) inputs and the a priori bound of an fp32 kernel:
    (γ_{d_in+1} + γ_{d_out} + u) (|A||A|ᵀ + b) ⊙ (|E||E|ᵀ)."""
    A64, E64 = A.double(), E.double()
    b = 1.0 if bias else 0.0
    exact = (A64 @ A64.T + b) * (E64 @ E64.T)
    magnitude = (A64.abs() @ A64.abs().T + b) * (E64.abs() @ E64.abs().T)
    coeff = gamma(A.shape[1] + 1) + gamma(E.shape[1]) + U32
    return exact, coeff * magnitude + 1e-30


@pytest.mark.parametrize("device,backend", device_backend_params("gram_linear"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_matches_float64(device, backend, dtype, shape, bias):
    A, E = _inputs(*shape, dtype, device)
    K = lk.gram_linear(A, E, bias, backend=backend)
    assert K.dtype == torch.float32 and K.shape == (shape[0], shape[0])
    exact, bound = _exact_and_bound(A, E, bias)
    assert_within(K.cpu(), exact.cpu(), bound.cpu(), f"{backend} {dtype} {shape}")
    assert torch.equal(K, K.T), "K must be exactly symmetric (upper triangle mirrored)"


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "native"])
def test_bf16_on_gpu(backend):
    A, E = _inputs(129, 65, 33, torch.bfloat16, "cuda")
    K = lk.gram_linear(A, E, True, backend=backend)
    exact, bound = _exact_and_bound(A, E, True)
    assert_within(K.cpu(), exact.cpu(), bound.cpu(), f"{backend} bf16")


@pytest.mark.parametrize("device,backend", device_backend_params("gram_linear"))
def test_noncontiguous_inputs(device, backend):
    big, E_t = _inputs(37, 46, 37, torch.float32, device, seed=3)
    A = big[:, ::2]  # stride 2 along d_in
    E = E_t.T.contiguous().T[:, :19]  # column-major view
    assert not A.is_contiguous() and not E.is_contiguous()
    K = lk.gram_linear(A, E, True, backend=backend)
    exact, bound = _exact_and_bound(A, E, True)
    assert_within(K.cpu(), exact.cpu(), bound.cpu(), f"{backend} non-contiguous")


def test_float64_reference_is_the_oracle():
    A, E = _inputs(9, 4, 6, torch.float64, "cpu")
    K = lk.gram_linear(A, E, True, backend="reference")
    assert K.dtype == torch.float64
    G = torch.einsum("bo,bi->boi", E, torch.cat([A, torch.ones(9, 1, dtype=A.dtype)], 1))
    torch.testing.assert_close(K, G.flatten(1) @ G.flatten(1).T, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_equals_per_sample_gradients_of_nn_linear(device, bias):
    """K_ij = ⟨∇_θ ℓ_i, ∇_θ ℓ_j⟩ for a real nn.Linear, per-sample grads from torch.func."""
    torch.manual_seed(0)
    B, d_in, d_out = 11, 7, 5
    layer = torch.nn.Linear(d_in, d_out, bias=bias, dtype=torch.float64, device=device)
    x = torch.randn(B, d_in, dtype=torch.float64, device=device)
    target = torch.randn(B, d_out, dtype=torch.float64, device=device)
    params = dict(layer.named_parameters())

    def sample_loss(p, xi, ti):
        y = torch.func.functional_call(layer, p, (xi[None],))
        return torch.sum(torch.tanh(y[0]) * ti)

    grads = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(params, x, target)
    U = torch.cat([g.flatten(1) for g in grads.values()], dim=1)  # B × D
    K_exact = U @ U.T

    y = layer(x)
    E, = torch.autograd.grad(torch.sum(torch.tanh(y) * target), y)
    for backend in backends_for("gram_linear", device, torch.float32):
        K = lk.gram_linear(x.float(), E.float(), bias, backend=backend)
        torch.testing.assert_close(K.double(), K_exact, rtol=1e-5, atol=1e-6 * float(K_exact.abs().max()))
    torch.testing.assert_close(lk.gram_linear(x, E, bias, backend="reference"), K_exact,
                               rtol=1e-12, atol=1e-12)


def test_opcheck_public_and_native():
    A, E = _inputs(5, 3, 4, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.lowrank_kernels.gram_linear.default, (A, E, True, None))
    with lk.use_backend("reference"):
        torch.library.opcheck(torch.ops.lowrank_kernels.gram_linear.default, (A, E, False))


def test_torch_compile_fullgraph_traces():
    A, E = _inputs(6, 3, 4, torch.float32, "cpu")

    def f(a, e):
        return lk.gram_linear(a, e, True).sum(dim=1) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(A, E), f(A, E))


# ---- bad input: every error names the argument ----------------------------------------

@pytest.mark.parametrize("backend", [None, "reference"])
def test_bad_input_errors_name_the_argument(backend):
    A, E = _inputs(4, 3, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"A must be a 2 or 3-D tensor"):
        lk.gram_linear(A[None, None], E, backend=backend)
    with pytest.raises(ValueError, match=r"E must be a 2 or 3-D tensor"):
        lk.gram_linear(A, E[:, 0], backend=backend)
    with pytest.raises(ValueError, match=r"A and E must have the same batch size"):
        lk.gram_linear(A, E[:3], backend=backend)
    with pytest.raises(TypeError, match=r"A must have a floating dtype"):
        lk.gram_linear(A.long(), E, backend=backend)
    with pytest.raises(ValueError, match=r"A and E must have the same dtype"):
        lk.gram_linear(A, E.half(), backend=backend)
    bad = A.clone()
    bad[2, 1] = float("nan")
    with lk.strict(), pytest.raises(lk.NonFiniteError, match=r"A contains non-finite values"):
        lk.gram_linear(bad, E, backend=backend)
    bad = E.clone()
    bad[0, 0] = float("inf")
    with lk.strict(), pytest.raises(lk.NonFiniteError, match=r"E contains non-finite values"):
        lk.gram_linear(A, bad, backend=backend)


@pytest.mark.cuda
def test_mismatched_devices():
    A, E = _inputs(4, 3, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"A and E must have the same device"):
        lk.gram_linear(A, E.cuda())


def test_backend_selection():
    A, E = _inputs(4, 3, 2, torch.float32, "cpu")
    spec = lk.REGISTRY["gram_linear"]
    with pytest.raises(ValueError, match=r"backend must be one of"):
        lk.gram_linear(A, E, backend="cublas")
    assert lk.choose_backend(spec, "cpu", torch.float32) == (
        "native" if lk._capabilities.native_built() else "reference")
    assert lk.choose_backend(spec, "cpu", torch.float32, "reference") == "reference"
    with pytest.raises(BackendUnavailableError, match=r"triton.*float64"):
        lk.gram_linear(A.double(), E.double(), backend="triton")
    with pytest.raises(BackendUnavailableError, match=r"gram_linear has no cpu backend"):
        lk.gram_linear(A, E, backend="cpu")


# ---- tokens (B, T, d), cross-Gram, diagonal, routes ------------------------------------

TOKEN_BACKENDS = device_backend_params("gram_linear")
# (B, T, d_in, d_out, bias)
TOKEN_SHAPES = [(1, 2, 3, 4, True), (3, 5, 7, 2, False), (5, 3, 33, 17, True)]
ROUTES = ["token_pair", "per_sample"]


def _tokens(B, T, d_in, d_out, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, T, d_in, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    E = torch.randn(B, T, d_out, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return A, E


def _token_bound(A, E, bias, A2=None, E2=None, diagonal=False):
    """float64 result of the rounded inputs, and γ_n M with M the same Gram of |A|, |E|:
    |Σ_{t,s} (a·a' + b)(e·e')| ≤ M covers both routes (|G_i|·|G_j| ≤ M entrywise as well);
    n counts every fp32 rounding on the way (inner products, token pairs, parameters)."""
    from lowrank_kernels.reference.gram_linear import gram_linear as ref

    def f64(*ts):
        return [None if t is None else t.double().cpu() for t in ts]

    A, E, A2, E2 = f64(A, E, A2, E2)
    exact = ref(A, E, bias, A2, E2, diagonal)
    absolute = [None if t is None else t.abs() for t in (A, E, A2, E2)]
    magnitude = ref(*absolute[:2], bias, *absolute[2:], diagonal)
    T, d_in, d_out = A.shape[1], A.shape[2], E.shape[2]
    n = (d_in + 1) + d_out + T * T + T + d_out * (d_in + 1) + 64
    return exact, gamma(n) * magnitude + 1e-30


@pytest.mark.parametrize("device,backend", TOKEN_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", TOKEN_SHAPES,
                         ids=lambda s: "x".join(map(str, s[:4])) + ("-bias" if s[4] else ""))
@pytest.mark.parametrize("route", ROUTES)
def test_tokens_match_float64(device, backend, dtype, case, route):
    *shape, bias = case
    A, E = _tokens(*shape, dtype, device)
    A2, E2 = _tokens(shape[0] + 2, *shape[1:], dtype, device, seed=1)
    K = lk.gram_linear(A, E, bias, route=route, backend=backend)
    assert K.dtype == torch.float32 and K.shape == (shape[0], shape[0])
    assert torch.equal(K, K.T), "K must be exactly symmetric (upper triangle mirrored)"
    exact, bound = _token_bound(A, E, bias)
    assert_within(K.cpu(), exact, bound, f"{backend} {route} K")
    d = lk.gram_linear(A, E, bias, diagonal=True, route=route, backend=backend)
    assert d.shape == (shape[0],)
    exact, bound = _token_bound(A, E, bias, diagonal=True)
    assert_within(d.cpu(), exact, bound, f"{backend} {route} diagonal")
    C = lk.gram_linear(A, E, bias, A2=A2, E2=E2, route=route, backend=backend)
    assert C.shape == (shape[0], shape[0] + 2)
    exact, bound = _token_bound(A, E, bias, A2, E2)
    assert_within(C.cpu(), exact, bound, f"{backend} {route} cross")
    c = lk.gram_linear(A, E, bias, A2=A2[2:], E2=E2[2:], diagonal=True, route=route,
                       backend=backend)
    exact, bound = _token_bound(A, E, bias, A2[2:], E2[2:], diagonal=True)
    assert_within(c.cpu(), exact, bound, f"{backend} {route} cross diagonal")


@pytest.mark.cuda
@pytest.mark.parametrize("route", ROUTES)
def test_tokens_bf16_on_gpu(route):
    A, E = _tokens(37, 19, 65, 33, torch.bfloat16, "cuda")
    K = lk.gram_linear(A, E, True, route=route, backend="triton")
    exact, bound = _token_bound(A, E, True)
    assert_within(K.cpu(), exact, bound, f"triton bf16 {route}")


@pytest.mark.parametrize("device,backend", TOKEN_BACKENDS)
def test_per_sample_route_in_a_small_workspace(device, backend, monkeypatch):
    """A workspace of two 64×128 tiles a sample (2 samples; 5 for the cross-Gram, which then
    holds one 64×64 tile): the 150×101 parameters go through as 2 output-tile chunks, the
    second partial (symmetric, diagonal), or as 2 k-chunks × 3 output-tile chunks (cross)."""
    import lowrank_kernels.triton.gram_linear as triton_gram

    monkeypatch.setattr(triton_gram, "WORKSPACE_BYTES", 2 * 2 * 64 * 128 * 4)
    A, E = _tokens(2, 3, 100, 150, torch.float32, device)
    A2, E2 = _tokens(3, 3, 100, 150, torch.float32, device, seed=1)
    for kwargs in ({}, {"diagonal": True}, {"A2": A2, "E2": E2},
                   {"A2": A2[1:], "E2": E2[1:], "diagonal": True}):
        K = lk.gram_linear(A, E, True, route="per_sample", backend=backend, **kwargs)
        exact, bound = _token_bound(A, E, True, kwargs.get("A2"), kwargs.get("E2"),
                                    kwargs.get("diagonal", False))
        assert_within(K.cpu(), exact, bound, f"{backend} chunked {sorted(kwargs)}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_tokens_equal_per_sample_gradients_of_nn_linear(device, bias):
    """K_ij = ⟨∇_θ ℓ_i, ∇_θ ℓ_j⟩ for nn.Linear applied to T tokens (torch.func per-sample
    gradients), and the cross-Gram with a second batch."""
    from per_sample import linear_case

    x, E, U = linear_case(4, 6, 5, 3, bias, device)
    x2, E2, U2 = linear_case(3, 6, 5, 3, bias, device, seed=7)
    for backend in backends_for("gram_linear", device, torch.float32):
        for route in ROUTES:
            K = lk.gram_linear(x.float(), E.float(), bias, route=route, backend=backend)
            scale = float((U @ U.T).abs().max())
            torch.testing.assert_close(K.double(), U @ U.T, rtol=1e-5, atol=1e-6 * scale)
            C = lk.gram_linear(x.float(), E.float(), bias, A2=x2.float(), E2=E2.float(),
                               route=route, backend=backend)
            torch.testing.assert_close(C.double(), U @ U2.T, rtol=1e-5, atol=1e-6 * scale)
    for route in ROUTES:
        torch.testing.assert_close(lk.gram_linear(x, E, bias, route=route, backend="reference"),
                                   U @ U.T, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            lk.gram_linear(x, E, bias, diagonal=True, route=route, backend="reference"),
            (U * U).sum(1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,backend", TOKEN_BACKENDS)
def test_tokens_noncontiguous_inputs(device, backend):
    big, E_t = _tokens(5, 6, 14, 9, torch.float32, device, seed=3)
    A = big[:, ::2, ::2]  # strided tokens and columns
    E = E_t.transpose(0, 1).contiguous().transpose(0, 1)[:, ::2]  # token-major storage
    assert not A.is_contiguous() and not E.is_contiguous()
    for route in ROUTES:
        K = lk.gram_linear(A, E, True, route=route, backend=backend)
        exact, bound = _token_bound(A, E, True)
        assert_within(K.cpu(), exact, bound, f"{backend} {route} non-contiguous")


def test_route_model():
    from lowrank_kernels.ops.gram_linear import choose_route

    # T = 1: the token pair route always; long sequences of a small layer: per sample.
    assert choose_route(256, 256, 1, 4096, 4096, 1, True, False, False) == "token_pair"
    assert choose_route(32, 32, 1024, 27, 64, 1, False, False, False) == "per_sample"
    assert choose_route(32, 32, 512, 768, 768, 1, False, False, False) == "per_sample"
    assert choose_route(32, 32, 16, 4608, 512, 1, False, False, False) == "token_pair"


def test_opcheck_tokens_cross_diagonal():
    A, E = _tokens(4, 3, 5, 2, torch.float32, "cpu")
    A2, E2 = _tokens(2, 3, 5, 2, torch.float32, "cpu", seed=1)
    op = torch.ops.lowrank_kernels.gram_linear.default
    with lk.use_backend("reference"):
        torch.library.opcheck(op, (A, E, True), {"route": "per_sample"})
    torch.library.opcheck(op, (A, E, False, A2, E2))
    torch.library.opcheck(op, (A, E, True), {"diagonal": True})


def test_torch_compile_fullgraph_traces_tokens():
    A, E = _tokens(4, 3, 5, 2, torch.float32, "cpu")

    def f(a, e):
        return lk.gram_linear(a, e, True, route="per_sample").sum(1) + \
            lk.gram_linear(a, e, diagonal=True)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(A, E), f(A, E))


@pytest.mark.parametrize("backend", [None, "reference"])
def test_bad_token_inputs_name_the_argument(backend):
    A, E = _tokens(4, 3, 5, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"A and E must have the same token count T"):
        lk.gram_linear(A, E[:, :2], backend=backend)
    with pytest.raises(ValueError, match=r"A and E must have the same number of dims"):
        lk.gram_linear(A, E[:, 0], backend=backend)
    with pytest.raises(ValueError, match=r"A2 and E2 must be given together"):
        lk.gram_linear(A, E, A2=A, backend=backend)
    with pytest.raises(ValueError, match=r"diagonal=True with A2/E2 needs the first batch's"):
        lk.gram_linear(A, E, A2=A[:3], E2=E[:3], diagonal=True, backend=backend)
    with pytest.raises(ValueError, match=r"A2 must have the first batch's shape"):
        lk.gram_linear(A, E, A2=A[:, :, :4], E2=E, backend=backend)
    with pytest.raises(ValueError, match=r"A2 and E2 must have the same batch size"):
        lk.gram_linear(A, E, A2=A[:3], E2=E, backend=backend)
    with pytest.raises(ValueError, match=r"E2 and the first batch must have the same dtype"):
        lk.gram_linear(A, E, A2=A, E2=E.double(), backend=backend)
    with pytest.raises(ValueError, match=r"route must be one of"):
        lk.gram_linear(A, E, route="tokens", backend=backend)
    bad = A.clone()
    bad[1, 2, 3] = float("nan")
    with lk.strict(), pytest.raises(lk.NonFiniteError, match=r"A2 contains non-finite values"):
        lk.gram_linear(A, E, A2=bad, E2=E, backend=backend)


@pytest.mark.parametrize("device,backend", TOKEN_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (3, 0, 4, 5), (3, 2, 0, 5), (3, 2, 4, 0)],
                         ids=["B0", "T0", "d_in0", "d_out0"])
def test_empty_dimensions(device, backend, shape):
    """No samples, tokens, inputs or outputs: K is what the float64 formula gives (zeros, or
    the bias part alone when d_in = 0)."""
    A, E = _tokens(*shape, torch.float32, device)
    for route in ROUTES:
        for diagonal in (False, True):
            K = lk.gram_linear(A, E, True, diagonal=diagonal, route=route, backend=backend)
            exact, bound = _token_bound(A, E, True, diagonal=diagonal)
            assert_within(K.cpu(), exact, bound, f"{backend} {route} {shape}")
