"""The CPU kernels (C++, csrc/<op>.cpp): each against the float64 reference
(lowrank_kernels.reference) with a priori bounds (Higham §3.1: γ_n times the same computation on |inputs|), at odd shapes
(B = 1, primes), size-0 dims, non-contiguous inputs, fp32, fp16 (fp32 accumulation) and float64,
and through each route of the kernels that choose one."""
import pytest
import torch
from layer_bounds import exact_and_bound
from inputs import noncontiguous, rand
from numerics import U32, U64, assert_within, gamma

import lowrank_kernels as lk
from lowrank_kernels import _capabilities as caps
from lowrank_kernels.reference import gram_conv2d as ref_gram_conv2d
from lowrank_kernels.reference import gram_linear as ref_gram_linear
from lowrank_kernels.reference import project_conv2d as ref_project_conv2d
from lowrank_kernels.reference import project_linear as ref_project_linear
from lowrank_kernels.reference import subspace_project as ref_subspace
from lowrank_kernels.reference import weighted_sum_conv2d as ref_weighted_sum_conv2d
from lowrank_kernels.reference import weighted_sum_linear as ref_weighted_sum_linear
from lowrank_kernels.reference.sketch_omega import sketch_omega as ref_sketch_omega

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [torch.float32, torch.float16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "fp64"]
def _check(out, expected, dtype, what):
    """Each output in the accumulation dtype, of the exact shape, within its bound (float64:
    the bound with the float64 unit roundoff)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    outs = out if isinstance(out, tuple) else (out,)
    for i, (o, (exact, bound)) in enumerate(zip(outs, expected)):
        if exact is None:
            assert o is None, f"{what}: output {i} must be None"
            continue
        assert o.dtype == acc and o.shape == exact.shape, \
            f"{what}: output {i} {o.dtype} {tuple(o.shape)} against {tuple(exact.shape)}"
        if dtype == torch.float64:
            bound = bound * (U64 / U32)
        assert_within(o, exact, bound, f"{what} output {i}")


def _bound(run, tensors, args, n, dtype):
    """(exact, γ_n·M) from the float64 reference, on the (rounded) inputs; fp16 adds nothing: its
    inputs convert to fp32 exactly."""
    return exact_and_bound(run, tensors, args, n, u_extra=U32 if dtype != torch.float64 else 0)


# ---- gram_linear / gram_conv2d (C++: csrc/gram_linear.cpp, csrc/gram_conv2d.cpp) ---------

native = pytest.mark.skipif(not caps.native_built(), reason="the native extension is not built")


def _gram_tokens(A, E, bias, A2, E2, diagonal, route, groups=1):
    """The C++ token core with its route and group count forced (a test-only op)."""
    return torch.ops.lowrank_kernels_testing.gram_tokens(A, E, bias, A2, E2, diagonal, route,
                                                         groups)


# (B, B2, T, d_in, d_out, groups); T = 0 means 2-D inputs (T = 1).
GRAM_SHAPES = [(1, 1, 0, 1, 1, 1), (13, 5, 0, 17, 11, 1), (131, 7, 0, 5, 3, 1),
               (7, 3, 5, 6, 4, 1), (5, 2, 3, 6, 4, 2), (2, 3, 0, 0, 3, 1), (3, 2, 1, 3, 2, 1)]


def _gram_n(T, d_in, d_out, groups):
    """Terms of the longest rounding chain of either route: token pair d_in + 1 + d_out + T²,
    per sample T + d_out·(d_in + 1), plus the group sum."""
    T = max(T, 1)
    return max(d_in + 1 + d_out + T * T, T + d_out * (d_in + 1)) + groups + 3


@native
@pytest.mark.parametrize("route", ["token_pair", "per_sample", "auto"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", GRAM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gram_linear(shape, dtype, route):
    B, B2, T, d_in, d_out, G = shape
    lead = (B,) if T == 0 else (B, T)
    lead2 = (B2,) if T == 0 else (B2, T)
    A, E = rand(*lead, G * d_in, dtype=dtype, seed=0), rand(*lead, G * d_out, dtype=dtype, seed=1)
    A2, E2 = rand(*lead2, G * d_in, dtype=dtype, seed=2), rand(*lead2, G * d_out, dtype=dtype, seed=3)
    n = _gram_n(T, d_in, d_out, G)
    for bias in (False, True):
        for second, diagonal in (((None, None), False), ((A2, E2), False), ((None, None), True),
                                 ((noncontiguous(A), E[..., :]), True)):
            def run(A_, E_, A2_, E2_, bias=bias, diagonal=diagonal):
                return ref_gram_linear.gram_linear(A_, E_, bias, A2_, E2_, diagonal, "token_pair", G)

            expected = _bound(run, (A, E, *second), (), n, dtype)
            K = _gram_tokens(A, E, bias, *second, diagonal, route, G)
            _check(K, expected, dtype, f"{shape} bias={bias} diag={diagonal}")
            if second[0] is None and not diagonal:
                assert torch.equal(K, K.T), "K must be exactly symmetric"
            if G == 1:  # the public op: the same kernel, its checks in front
                torch.testing.assert_close(lk.gram_linear(A, E, bias, A2=second[0],
                                                          E2=second[1], diagonal=diagonal,
                                                          route=route), K, rtol=0, atol=0)
    K = _gram_tokens(noncontiguous(A), noncontiguous(E), True, None, None, False, route, G)
    _check(K, _bound(ref_gram_linear.gram_linear, (A, E), (True, None, None, False,
                                                             "token_pair", G), n, dtype),
           dtype, "non-contiguous")


@native
def test_gram_linear_triangle_blocks_and_pair_blocks():
    """Shapes past every block bound of the C++ core: B ≥ 128 (upper block rows of the
    triangle, T = 1 and per sample), token-pair blocks (2²⁰ entries: T²·B > 2²⁰ / rows,
    T² · rows > 2²⁰ for the diagonal) and per-sample gradient blocks (2²² entries)."""
    shapes = [((150, 9), (150, 5)), ((300, 40), (300, 24)), ((140, 10, 3), (140, 10, 5)),
              ((70, 128, 2), (70, 128, 3)), ((150, 2, 200), (150, 2, 160))]
    for k, (sa, se) in enumerate(shapes):
        A, E = rand(*sa, dtype=torch.float32, seed=4 + k), rand(*se, dtype=torch.float32, seed=9 + k)
        T = A.shape[1] if A.dim() == 3 else 0
        n = _gram_n(T, A.shape[-1], E.shape[-1], 1)
        for route in ("token_pair", "per_sample"):
            if route == "token_pair" and T > 10 and A.shape[0] * T > 4096:
                continue  # (B·T)² token pairs: too slow to be worth it here
            for diagonal in (False, True):
                args = (True, None, None, diagonal, "token_pair", 1)
                K = _gram_tokens(A, E, True, None, None, diagonal, route)
                _check(K, _bound(ref_gram_linear.gram_linear, (A, E), args, n, torch.float32),
                       torch.float32, f"{tuple(A.shape)} {route} diag={diagonal}")
                if not diagonal:
                    assert torch.equal(K, K.T), "K must be exactly symmetric"


@native
def test_gram_linear_route_model():
    """auto: the per-sample route where T² ≫ d_in·d_out / B, token pair at T = 1 (the bench
    shapes, where the measured faster route is the one named)."""
    def choose(*args):
        return ("token_pair", "per_sample")[torch.ops.lowrank_kernels_testing.gram_route(*args)]

    assert choose(256, 256, 1, 1024, 1024, 1, False, False, False) == "token_pair"
    assert choose(16, 16, 1, 256, 256, 1, False, False, False) == "token_pair"
    assert choose(4, 4, 64, 64, 192, 1, False, False, False) == "per_sample"
    assert choose(4, 4, 32, 128, 128, 1, False, False, False) == "per_sample"
    assert choose(4, 4, 256, 144, 16, 1, False, False, False) == "per_sample"
    assert choose(32, 32, 512, 768, 768, 1, False, False, False) == "per_sample"
    assert choose(64, 64, 4, 768, 768, 1, False, False, False) == "token_pair"


@native
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gram_conv2d(dtype):
    """The C++ conv kernel (im2col, then the token core on its auto route) at geometries with
    stride, padding, dilation and groups; the token core's routes on the same tokens."""
    from lowrank_kernels.reference.conv2d_tokens import input_tokens, output_tokens

    X, E = rand(3, 4, 7, 6, dtype=dtype, seed=0), rand(3, 6, 4, 3, dtype=dtype, seed=1)
    X2, E2 = rand(2, 4, 7, 6, dtype=dtype, seed=2), rand(2, 6, 4, 3, dtype=dtype, seed=3)
    geometry = ((3, 2), (2, 2), (1, 0), (1, 1), 2)
    n = _gram_n(12, 2 * 3 * 2, 3, 2)
    for bias, second, diagonal in ((False, (None, None), False), (True, (X2, E2), False),
                                   (True, (None, None), True)):
        def run(X_, E_, X2_, E2_, bias=bias, diagonal=diagonal):
            return ref_gram_conv2d.gram_conv2d(X_, E_, *geometry, bias, X2_, E2_, diagonal,
                                               "token_pair")

        expected = _bound(run, (X, E, *second), (), n, dtype)
        K = lk.gram_conv2d(X, E, *geometry[:4], groups=2, bias=bias, X2=second[0], E2=second[1],
                           diagonal=diagonal)
        _check(K, expected, dtype, f"auto bias={bias} diag={diagonal}")
        tokens = [(input_tokens(x, *geometry[:4]), output_tokens(e)) if x is not None
                  else (None, None) for x, e in ((X, E), second)]
        for route in ("token_pair", "per_sample"):
            K = _gram_tokens(*tokens[0], bias, *tokens[1], diagonal, route, 2)
            _check(K, expected, dtype, f"{route} bias={bias} diag={diagonal}")


@native
def test_gram_conv2d_im2col_geometries():
    """The C++ im2col against F.unfold's tokens (the float64 reference) where padding, stride and
    dilation put taps outside the input on either side, and a 1×1 output."""
    for shape, k, s, p, d in (((2, 3, 9, 8), (3, 3), (1, 1), (1, 1), (1, 1)),
                              ((2, 2, 9, 8), (3, 2), (2, 3), (2, 1), (2, 1)),
                              ((1, 2, 5, 7), (2, 3), (3, 2), (0, 2), (1, 3)),
                              ((3, 1, 3, 3), (3, 3), (1, 1), (0, 0), (1, 1))):
        X = rand(*shape, dtype=torch.float64, seed=7)
        h = (shape[2] + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
        w = (shape[3] + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
        E = rand(shape[0], 4, h, w, dtype=torch.float64, seed=8)
        for diagonal in (False, True):
            K = lk.gram_conv2d(X, E, k, s, p, d, bias=True, diagonal=diagonal)
            R = ref_gram_conv2d.gram_conv2d(X, E, k, s, p, d, 1, True, None, None, diagonal,
                                            "token_pair")
            torch.testing.assert_close(K, R, rtol=1e-12, atol=1e-12)


# ---- weighted_sum_* / project_* (C++: csrc/{weighted_sum,project}_{linear,conv2d}.cpp) ----

# (B, T, d_in, d_out, groups, m); m = 0: a coefficient vector (B,) / one direction. The last
# shapes take the float32 AVX2 loops' full 32-wide and 16-wide blocks, tails and m % 4 tails,
# and (scaled, d_out <= d_in, few rows) the register-tiled rank update's 4-row tiles and tails.
LAYER_SHAPES = [(1, 1, 1, 1, 1, 0), (13, 1, 7, 11, 1, 3), (5, 7, 3, 11, 1, 2),
                (3, 5, 6, 4, 2, 3), (4, 3, 5, 2, 1, 0), (0, 3, 2, 2, 1, 2), (3, 0, 2, 3, 1, 2),
                (3, 9, 37, 13, 1, 5), (2, 4, 64, 40, 1, 7), (5, 1, 33, 70, 1, 4),
                (6, 2, 37, 9, 1, 3), (16, 1, 40, 40, 1, 4)]


def _tokens(route):
    """The C++ token cores with the route and group count forced (test-only ops)."""
    ops = torch.ops.lowrank_kernels_testing

    def weighted_sum(A, E, c, bias, groups):
        return ops.weighted_sum_tokens(A, E, c, bias, groups, route)

    def project(A, E, V, V_bias, groups):
        return ops.project_tokens(A, E, V, V_bias, groups, route)
    return weighted_sum, project


@native
@pytest.mark.parametrize("route", ["scaled", "per_sample", "auto"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_weighted_sum_and_project_linear(shape, dtype, route):
    weighted_sum, project = _tokens(route)
    B, T, d_in, d_out, G, m = shape
    A, E = rand(B, T, G * d_in, dtype=dtype, seed=0), rand(B, T, G * d_out, dtype=dtype, seed=1)
    c = rand(B, *((m,) if m else ()), dtype=dtype, seed=2)
    V = rand(*((m,) if m else ()), G * d_out, d_in, dtype=dtype, seed=3)
    Vb = rand(*((m,) if m else ()), G * d_out, dtype=dtype, seed=4)
    n_sum = B * T + B + T + 2
    n_dot = max(d_in + d_out + T, T + d_out * d_in) + G + d_out + 3
    for A_, E_ in ((A, E), (noncontiguous(A), noncontiguous(E))):
        for bias in (False, True):
            out = weighted_sum(A_, E_, c, bias, G)
            _check(out, _bound(ref_weighted_sum_linear.weighted_sum_linear, (A, E, c), (bias, G),
                               n_sum, dtype), dtype, f"U c bias={bias}")
            vb = Vb if bias else None
            out = project(A_, E_, V, vb, G)
            _check(out, _bound(ref_project_linear.project_linear, (A, E, V, vb), (G,), n_dot,
                               dtype), dtype, f"Uᵀ V bias={bias}")


# (B, C_in, C_out, H, W, kernel, stride, padding, dilation, groups, m)
CONV_LAYER_SHAPES = [(3, 4, 6, 7, 6, (3, 2), (2, 2), (1, 0), (1, 1), 2, 2),
                     (2, 3, 5, 9, 7, (3, 3), (2, 1), (2, 1), (2, 1), 1, 0),
                     (4, 3, 16, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, 4),
                     (2, 2, 3, 5, 5, (5, 5), (1, 1), (0, 0), (1, 1), 1, 3),
                     (2, 4, 2, 4, 4, (1, 1), (1, 1), (0, 0), (1, 1), 2, 5)]


@native
@pytest.mark.parametrize("route", ["scaled", "per_sample", "auto"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", CONV_LAYER_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}k{s[5]}")
def test_weighted_sum_and_project_conv2d(shape, dtype, route):
    B, C_in, C_out, H, W, k, st, pad, dil, G, m = shape
    H_out = (H + 2 * pad[0] - dil[0] * (k[0] - 1) - 1) // st[0] + 1
    W_out = (W + 2 * pad[1] - dil[1] * (k[1] - 1) - 1) // st[1] + 1
    X = rand(B, C_in, H, W, dtype=dtype, seed=0)
    E = rand(B, C_out, H_out, W_out, dtype=dtype, seed=1)
    c = rand(B, *((m,) if m else ()), dtype=dtype, seed=2)
    V = rand(*((m,) if m else ()), C_out, C_in // G, *k, dtype=dtype, seed=3)
    Vb = rand(*((m,) if m else ()), C_out, dtype=dtype, seed=4)
    geometry = (st, pad, dil, G)
    T, d_in = H_out * W_out, C_in // G * k[0] * k[1]
    ops = torch.ops.lowrank_kernels_testing
    for bias in (False, True):
        out = ops.weighted_sum_conv2d_route(X, E, c, k, *geometry, bias, route)
        _check(out, _bound(ref_weighted_sum_conv2d.weighted_sum_conv2d, (X, E, c),
                           (k, *geometry, bias), B * T + B + T + 2, dtype), dtype,
               f"U c conv bias={bias}")
        vb = Vb if bias else None
        out = ops.project_conv2d_route(X, E, V, vb, *geometry, route)
        _check(out, _bound(ref_project_conv2d.project_conv2d, (X, E, V, vb), geometry,
                           max(d_in + C_out + T, T + C_out * d_in) + G + C_out + 3, dtype),
               dtype, f"Uᵀ V conv bias={bias}")


# ---- subspace: stored P, random P -------------------------------------------------------

def subspace_project(P, g):
    return lk.subspace_project(P, g, backend="native")


def subspace_expand(P, a, base=None):
    return lk.subspace_expand(P, a, base, backend="native")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("D,k", [(0, 3), (1, 1), (7, 0), (1009, 7), (20011, 16), (203, 37),
                                 (97, 64), (61, 65)])
def test_subspace_project_expand(D, k, dtype):
    """csrc/subspace_project.cpp: the AVX2 register kernels (fp32; unit column stride, k <= 64:
    masked tails, several row chunks at D = 20011, a padded row stride; unit row stride: groups
    of 8 columns and the k % 8 left, several row blocks, a padded column stride), BLAS
    otherwise."""
    P, g = rand(D, k, dtype=dtype, seed=0), rand(D, dtype=dtype, seed=1)
    a, base = rand(k, dtype=dtype, seed=2), rand(D, dtype=dtype, seed=3)
    padded = torch.zeros(D, k + 3, dtype=dtype)[:, 1:k + 1]
    padded.copy_(P)
    padded_columns = torch.zeros(k, D + 5, dtype=dtype)[:, 2:D + 2].T
    padded_columns.copy_(P)
    for P_ in (P, P.T.contiguous().T, padded, padded_columns):
        _check(subspace_project(P_, g), _bound(ref_subspace.subspace_project, (P, g), (), D + 2,
                                               dtype), dtype, "Pᵀ g")
        for b in (base, None):
            w = subspace_expand(P_, a, b)
            assert w.dtype == dtype
            exact, bound = _bound(ref_subspace.subspace_expand, (P, a, b), (), k + 2, dtype)[0]
            out_u = {torch.float16: 2.0 ** -11, torch.float32: 0.0, torch.float64: 0.0}[dtype]
            _check(w.to(torch.float64 if dtype == torch.float64 else torch.float32),
                   [(exact, bound + out_u * exact.abs())], dtype, "base + P α")


@pytest.mark.parametrize("rademacher", [False, True], ids=["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("D,d", [(0, 4), (5, 0), (1, 1), (37, 9), (1013, 13), (5003, 70)])
def test_random_subspace(D, d, dtype, rademacher):
    """The native kernels (csrc/random_subspace.cpp; (5003, 70): several row chunks and column
    blocks, partial lane batches) against the reference's Ω in float64."""
    seed, s = 11, 0.3
    dist = "rademacher" if rademacher else "gaussian"
    Om = ref_sketch_omega(torch.arange(D), d, seed, rademacher).double()  # the reference's Ω
    a, base, g = rand(d, dtype=dtype, seed=0), rand(D, dtype=dtype, seed=1), \
        rand(D, dtype=dtype, seed=2)
    a64, base64, g64 = a.double(), base.double(), g.double()
    u = U64 if dtype == torch.float64 else U32
    w = lk.random_subspace_expand(a, seed, D, s, dist, base, backend="native")
    assert w.dtype == dtype and w.shape == (D,)
    assert_within(w, s * (Om @ a64) + base64,
                  gamma(d + 3, u) * (s * (Om.abs() @ a64.abs()) + base64.abs()) + 1e-300, "w")
    w = lk.random_subspace_expand(a, seed, D, s, dist, backend="native")
    assert w.dtype == dtype
    assert_within(w, s * (Om @ a64), gamma(d + 3, u) * s * (Om.abs() @ a64.abs()) + 1e-300, "w0")
    c = lk.random_subspace_project(g, seed, d, s, dist, backend="native")
    assert c.dtype == dtype and c.shape == (d,)
    assert_within(c, s * (Om.T @ g64), gamma(D + 2, u) * s * (Om.abs().T @ g64.abs()) + 1e-300,
                  "c")


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_random_subspace_generates_the_reference_omega_bit_for_bit(dist):
    """A one-hot g (α) reads one row (column) of the kernel's Ω out exactly: each equals the
    reference's Ω bit for bit (a seed with high bits; rows and columns at lane-batch edges)."""
    seed, D, d = 2 ** 62 + 12345, 3001, 131
    rows = torch.tensor([0, 1, 15, 16, 17, 1500, 2999, 3000])
    ref = ref_sketch_omega(rows, d, seed, dist == "rademacher")
    for r, i in enumerate(rows.tolist()):
        e = torch.zeros(D)
        e[i] = 1.0
        assert torch.equal(lk.random_subspace_project(e, seed, d, 1.0, dist, backend="native"),
                           ref[r]), f"row {i}"
    full = ref_sketch_omega(torch.arange(D), d, seed, dist == "rademacher")
    for j in (0, 1, 3, 4, 63, 64, 130):
        e = torch.zeros(d)
        e[j] = 1.0
        assert torch.equal(lk.random_subspace_expand(e, seed, D, 1.0, dist, backend="native"),
                           full[:, j]), f"column {j}"
