"""Property-based fuzz of every op × every backend that runs here × dtype × memory layout,
against independent float64 formulations with a priori bounds (fuzz_strategies.py).

Each (op, backend, dtype) is one hypothesis test with a fixed seed and no example database,
so every run draws the same cases and a failure prints the drawn example (and a
@reproduce_failure blob). The default run is sized for CI (≥ 1,000 cases, a few minutes on 2
cores); `pytest python_tests/test_fuzz_ops.py --fuzz-long` runs 20× as many. A summary line
(cases, mismatches, crashes) is printed at the end of the session. Triton runs under its
interpreter on CPU: its cases are tiny and fewer; bf16 runs on the reference/cpu backends
only (the interpreter computes bf16 wrongly).
"""
import math
import zlib

import pytest
import torch
from conftest import backends_for
from fuzz_strategies import (NAMES, Draw, U, acc_dtype, coeff, conv_grads, embedding_grads,
                             hadamard, linear_grads, omega_python, ulp32)
from hypothesis import HealthCheck, given, note, seed, settings
from hypothesis import strategies as st
from numerics import assert_within, gamma

import lowrank_kernels as lk
from lowrank_kernels.reference.sketch_omega import sketch_omega as reference_omega

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
STATS = {"cases": 0, "mismatches": 0, "crashes": 0}
CONV_LAYOUTS = ("contiguous", "strided", "transposed", "expanded", "channels_last")
LONG_FACTOR = 8
SUBNORMAL_HALF = {torch.float16: 2.0 ** -25, torch.bfloat16: 2.0 ** -134}


def _floor(dtype):
    """Bound floor where the magnitude is 0 (an exact 0 must come out 0, up to underflow)."""
    return 1e-300 if acc_dtype(dtype) == torch.float64 else 1e-30


def _check(out, exact, magnitude, n, dtype, what, out_dtype=None, extra=0.0, oracle_n=None):
    """out has the exact shape and the result dtype and is within (γ_n + u + extra)·M of the
    exact value; `exact` is itself a float64 computation, within γ_{oracle_n}(u64)·M of it
    (oracle_n: its longest summation chain, n by default), which the bound adds."""
    out_dtype = out_dtype or acc_dtype(dtype)
    assert out is not None, f"{what}: no output"
    assert out.dtype == out_dtype, f"{what}: dtype {out.dtype}, expected {out_dtype}"
    assert tuple(out.shape) == tuple(exact.shape), \
        f"{what}: shape {tuple(out.shape)}, expected {tuple(exact.shape)}"
    oracle = gamma(n if oracle_n is None else oracle_n, U[torch.float64])
    bound = (coeff(n, dtype) + extra + oracle) * magnitude + _floor(dtype)
    if out_dtype in (torch.float16, torch.bfloat16):
        # The result rounded to a low dtype: fl(y) = y(1 + δ) + η, |η| ≤ half the smallest
        # subnormal (Higham §2.1).
        bound = bound + U[out_dtype] * (exact.abs() + bound) + SUBNORMAL_HALF[out_dtype]
    assert_within(out.detach(), exact, bound, what)


def _dims(d, lo, hi, label):
    return d.int(lo, hi, label)


# ---- layer ops: linear -----------------------------------------------------------------------

def _linear_inputs(d, label="", B=None, T=None):
    B = _dims(d, 0, 5, f"B{label}") if B is None else B
    lead = (B,) if T is None else (B, T)
    return B, lead


def case_gram_linear(d, backend):
    tokens = d.bool("tokens")
    T = _dims(d, 0, 4, "T") if tokens else None
    B, lead = _linear_inputs(d, T=T)
    d_in, d_out = _dims(d, 0, 6, "d_in"), _dims(d, 0, 6, "d_out")
    bias = d.bool("bias")
    mode = d.pick(("gram", "cross", "diagonal", "cross_diagonal"), "mode")
    route = d.pick(("auto", "token_pair", "per_sample"), "route")
    A, A64 = d.tensor(lead + (d_in,), "A")
    E, E64 = d.tensor(lead + (d_out,), "E")
    cross, diagonal = mode.startswith("cross"), mode.endswith("diagonal")
    A2 = E2 = None
    A2_64, E2_64 = A64, E64
    if cross:
        B2 = B if diagonal else _dims(d, 0, 4, "B2")
        lead2 = (B2,) if T is None else (B2, T)
        A2, A2_64 = d.tensor(lead2 + (d_in,), "A2")
        E2, E2_64 = d.tensor(lead2 + (d_out,), "E2")
    K = lk.gram_linear(A, E, bias, A2=A2, E2=E2, diagonal=diagonal, route=route,
                       backend=backend)
    G1, Ga1 = (linear_grads(x, y, bias).flatten(1) for x, y in ((A64, E64), (A64.abs(), E64.abs())))
    G2, Ga2 = (linear_grads(x, y, bias).flatten(1)
               for x, y in ((A2_64, E2_64), (A2_64.abs(), E2_64.abs())))
    exact, M = ((G1 * G2).sum(1), (Ga1 * Ga2).sum(1)) if diagonal else (G1 @ G2.T, Ga1 @ Ga2.T)
    Tn = max(T or 1, 1)
    n = (d_in + 1) + d_out + Tn * Tn + Tn + d_out * (d_in + 1) + 4
    _check(K, exact, M, n, d.dtype, f"gram_linear {mode}")
    if mode == "gram":
        assert torch.equal(K, K.T), "K must be exactly symmetric"


def case_weighted_sum_linear(d, backend):
    T = _dims(d, 0, 4, "T") if d.bool("tokens") else None
    B, lead = _linear_inputs(d, T=T)
    d_in, d_out, bias = _dims(d, 0, 6, "d_in"), _dims(d, 0, 6, "d_out"), d.bool("bias")
    m = d.pick((None, 1, 2, 3), "m")
    A, A64 = d.tensor(lead + (d_in,), "A")
    E, E64 = d.tensor(lead + (d_out,), "E")
    c_dtype = d.dtype if d.dtype == torch.float64 else d.pick((d.dtype, torch.float32), "c.dtype")
    c, c64 = d.tensor((B,) if m is None else (B, m), "c", dtype=c_dtype)
    W, b = lk.weighted_sum_linear(A, E, c, bias, backend=backend)
    C, Ca = (c64[:, None] if m is None else c64), (c64.abs()[:, None] if m is None else c64.abs())
    G, Ga = linear_grads(A64, E64, True), linear_grads(A64.abs(), E64.abs(), True)
    exact, M = torch.einsum("bm,boi->moi", C, G), torch.einsum("bm,boi->moi", Ca, Ga)
    if m is None:
        exact, M = exact[0], M[0]
    Tn = max(T or 1, 1)
    n = B * Tn + B + Tn + 2
    _check(W, exact[..., :d_in], M[..., :d_in], n, d.dtype, "weighted_sum_linear W")
    if bias:
        _check(b, exact[..., d_in], M[..., d_in], n, d.dtype, "weighted_sum_linear bias")
    else:
        assert b is None, "no bias part without bias"


def case_project_linear(d, backend):
    T = _dims(d, 0, 4, "T") if d.bool("tokens") else None
    _, lead = _linear_inputs(d, T=T)
    d_in, d_out, bias = _dims(d, 0, 6, "d_in"), _dims(d, 0, 6, "d_out"), d.bool("bias")
    m = d.pick((None, 1, 2, 3), "m")
    A, A64 = d.tensor(lead + (d_in,), "A")
    E, E64 = d.tensor(lead + (d_out,), "E")
    stack = () if m is None else (m,)
    V, V64 = d.tensor(stack + (d_out, d_in), "V")
    Vb, Vb64 = d.tensor(stack + (d_out,), "V_bias") if bias else (None, None)
    out = lk.project_linear(A, E, V, Vb, backend=backend)
    Va = V64 if m is not None else V64[None]
    if bias:
        Va = torch.cat([Va, (Vb64 if m is not None else Vb64[None])[..., None]], -1)
    G, Ga = linear_grads(A64, E64, bias), linear_grads(A64.abs(), E64.abs(), bias)
    exact, M = torch.einsum("boi,moi->bm", G, Va), torch.einsum("boi,moi->bm", Ga, Va.abs())
    if m is None:
        exact, M = exact[:, 0], M[:, 0]
    Tn = max(T or 1, 1)
    n = (d_in + 1) + d_out + 2 * Tn + d_out * (d_in + 1) + 6
    _check(out, exact, M, n, d.dtype, f"project_linear m={m} bias={bias}")


# ---- layer ops: conv2d ---------------------------------------------------------------------

def _conv_geometry(d):
    groups = d.pick((1, 1, 2), "groups")
    C_in, C_out = groups * _dims(d, 1, 2, "C_in/g"), groups * _dims(d, 1, 2, "C_out/g")
    k = (_dims(d, 1, 3, "kh"), _dims(d, 1, 3, "kw"))
    stride = (_dims(d, 1, 2, "sh"), _dims(d, 1, 2, "sw"))
    padding = (_dims(d, 0, 1, "ph"), _dims(d, 0, 1, "pw"))
    dilation = (_dims(d, 1, 2, "dh"), _dims(d, 1, 2, "dw"))
    size, out = [], []
    for i in range(2):
        lowest = max(1, dilation[i] * (k[i] - 1) + 1 - 2 * padding[i])
        H = lowest + _dims(d, 0, 3, f"extra{i}")
        size.append(H)
        out.append((H + 2 * padding[i] - dilation[i] * (k[i] - 1) - 1) // stride[i] + 1)
    return dict(groups=groups, C_in=C_in, C_out=C_out, k=k, stride=stride, padding=padding,
                dilation=dilation, size=tuple(size), out=tuple(out))


def _conv_tensors(d, g, B, label=""):
    X, X64 = d.tensor((B, g["C_in"], *g["size"]), f"X{label}", layouts=CONV_LAYOUTS)
    E, E64 = d.tensor((B, g["C_out"], *g["out"]), f"E{label}", layouts=CONV_LAYOUTS)
    return X, X64, E, E64


def _conv_flat(X64, E64, g, bias):
    """Flattened per-sample gradients (B, params) of the weight [and bias]."""
    W, b = conv_grads(X64, E64, g["k"], g["stride"], g["padding"], g["dilation"], g["groups"], bias)
    return torch.cat([W.flatten(1), b], 1) if bias else W.flatten(1)


def _conv_n(g):
    d_in = g["C_in"] // g["groups"] * g["k"][0] * g["k"][1]
    T = g["out"][0] * g["out"][1]
    return d_in, T, (d_in + 1) + g["C_out"] + g["groups"] * T * T + T + g["C_out"] * (d_in + 1) + 64


def _geo_args(g):
    return dict(stride=g["stride"], padding=g["padding"], dilation=g["dilation"],
                groups=g["groups"])


def case_gram_conv2d(d, backend):
    g = _conv_geometry(d)
    B = _dims(d, 0, 3, "B")
    bias = d.bool("bias")
    mode = d.pick(("gram", "cross", "diagonal", "cross_diagonal"), "mode")
    X, X64, E, E64 = _conv_tensors(d, g, B)
    cross, diagonal = mode.startswith("cross"), mode.endswith("diagonal")
    X2 = E2 = None
    X2_64, E2_64 = X64, E64
    if cross:
        X2, X2_64, E2, E2_64 = _conv_tensors(d, g, B if diagonal else _dims(d, 0, 3, "B2"), "2")
    K = lk.gram_conv2d(X, E, list(g["k"]), bias=bias, X2=X2, E2=E2, diagonal=diagonal,
                       backend=backend, **_geo_args(g))
    G1, Ga1 = _conv_flat(X64, E64, g, bias), _conv_flat(X64.abs(), E64.abs(), g, bias)
    G2, Ga2 = _conv_flat(X2_64, E2_64, g, bias), _conv_flat(X2_64.abs(), E2_64.abs(), g, bias)
    exact, M = ((G1 * G2).sum(1), (Ga1 * Ga2).sum(1)) if diagonal else (G1 @ G2.T, Ga1 @ Ga2.T)
    _check(K, exact, M, _conv_n(g)[2], d.dtype, f"gram_conv2d {mode}")
    if mode == "gram":
        assert torch.equal(K, K.T), "K must be exactly symmetric"


def case_weighted_sum_conv2d(d, backend):
    g = _conv_geometry(d)
    B, bias, m = _dims(d, 0, 3, "B"), d.bool("bias"), d.pick((None, 1, 2), "m")
    X, X64, E, E64 = _conv_tensors(d, g, B)
    c_dtype = d.dtype if d.dtype == torch.float64 else d.pick((d.dtype, torch.float32), "c.dtype")
    c, c64 = d.tensor((B,) if m is None else (B, m), "c", dtype=c_dtype)
    W, b = lk.weighted_sum_conv2d(X, E, c, list(g["k"]), bias=bias, backend=backend,
                                  **_geo_args(g))
    C = c64[:, None] if m is None else c64
    Wg, bg = conv_grads(X64, E64, g["k"], g["stride"], g["padding"], g["dilation"],
                        g["groups"], True)
    Wa, ba = conv_grads(X64.abs(), E64.abs(), g["k"], g["stride"], g["padding"],
                        g["dilation"], g["groups"], True)
    exact, M = torch.einsum("bm,b...->m...", C, Wg), torch.einsum("bm,b...->m...", C.abs(), Wa)
    eb, Mb = C.T @ bg, C.abs().T @ ba
    if m is None:
        exact, M, eb, Mb = exact[0], M[0], eb[0], Mb[0]
    T = g["out"][0] * g["out"][1]
    n = B * T + B + T + 2
    _check(W, exact, M, n, d.dtype, "weighted_sum_conv2d W")
    if bias:
        _check(b, eb, Mb, n, d.dtype, "weighted_sum_conv2d bias")
    else:
        assert b is None, "no bias part without bias"


def case_project_conv2d(d, backend):
    g = _conv_geometry(d)
    B, bias, m = _dims(d, 0, 3, "B"), d.bool("bias"), d.pick((None, 1, 2), "m")
    X, X64, E, E64 = _conv_tensors(d, g, B)
    stack = () if m is None else (m,)
    V, V64 = d.tensor(stack + (g["C_out"], g["C_in"] // g["groups"], *g["k"]), "V",
                      layouts=CONV_LAYOUTS if m is None else None)
    Vb, Vb64 = d.tensor(stack + (g["C_out"],), "V_bias") if bias else (None, None)
    out = lk.project_conv2d(X, E, V, Vb, backend=backend, **_geo_args(g))
    Vf = (V64 if m is not None else V64[None]).flatten(1)
    if bias:
        Vf = torch.cat([Vf, Vb64 if m is not None else Vb64[None]], 1)
    G, Ga = _conv_flat(X64, E64, g, bias), _conv_flat(X64.abs(), E64.abs(), g, bias)
    exact, M = G @ Vf.T, Ga @ Vf.abs().T
    if m is None:
        exact, M = exact[:, 0], M[:, 0]
    d_in, T, _ = _conv_n(g)
    n = (d_in + 1) + g["C_out"] + 2 * T + g["groups"] + g["C_out"] * (d_in + 1) + 6
    _check(out, exact, M, n, d.dtype, f"project_conv2d m={m} bias={bias}")


# ---- layer ops: embedding ------------------------------------------------------------------

def _embedding_inputs(d, label="", B=None):
    B = _dims(d, 0, 4, f"B{label}") if B is None else B
    T = _dims(d, 0, 5, f"T{label}")
    return B, T


def _padding(d, N):
    return d.pick((None, None) + tuple(range(-N, N)), "padding_idx")


def case_gram_embedding(d, backend):
    N, dim = _dims(d, 1, 6, "N"), _dims(d, 0, 5, "d")
    B, T = _embedding_inputs(d)
    pad = _padding(d, N)
    mode = d.pick(("gram", "cross", "diagonal", "cross_diagonal"), "mode")
    cross, diagonal = mode.startswith("cross"), mode.endswith("diagonal")
    idx = d.index((B, T), N, "idx")
    E, E64 = d.tensor((B, T, dim), "E")
    idx2 = E2 = None
    B2, T2, idx2_, E2_64 = B, T, idx, E64
    if cross:
        B2 = B if diagonal else _dims(d, 0, 4, "B2")
        T2 = _dims(d, 0, 5, "T2")
        idx2 = idx2_ = d.index((B2, T2), N, "idx2")
        E2, E2_64 = d.tensor((B2, T2, dim), "E2")
    K = lk.gram_embedding(idx, E, N, pad, idx2=idx2, E2=E2, diagonal=diagonal,
                          backend=backend)
    G1, Ga1 = (embedding_grads(idx, x, N, pad).flatten(1) for x in (E64, E64.abs()))
    G2, Ga2 = (embedding_grads(idx2_, x, N, pad).flatten(1) for x in (E2_64, E2_64.abs()))
    exact, M = ((G1 * G2).sum(1), (Ga1 * Ga2).sum(1)) if diagonal else (G1 @ G2.T, Ga1 @ Ga2.T)
    n = T + T2 + (B * T + B2 * T2) * dim + T * T2 + dim + 4
    _check(K, exact, M, n, d.dtype, f"gram_embedding {mode} pad={pad}")
    if mode == "gram":
        assert torch.equal(K, K.T), "K must be exactly symmetric"


def case_weighted_sum_embedding(d, backend):
    N, dim = _dims(d, 1, 6, "N"), _dims(d, 0, 5, "d")
    B, T = _embedding_inputs(d)
    pad, m = _padding(d, N), d.pick((None, 1, 2, 3), "m")
    idx = d.index((B, T), N, "idx")
    E, E64 = d.tensor((B, T, dim), "E")
    c_dtype = d.dtype if d.dtype == torch.float64 else d.pick((d.dtype, torch.float32), "c.dtype")
    c, c64 = d.tensor((B,) if m is None else (B, m), "c", dtype=c_dtype)
    out = lk.weighted_sum_embedding(idx, E, c, N, pad, backend=backend)
    C = c64[:, None] if m is None else c64
    G, Ga = embedding_grads(idx, E64, N, pad), embedding_grads(idx, E64.abs(), N, pad)
    exact, M = torch.einsum("bm,bnd->mnd", C, G), torch.einsum("bm,bnd->mnd", C.abs(), Ga)
    if m is None:
        exact, M = exact[0], M[0]
    _check(out, exact, M, B * T + B + T + 2, d.dtype, f"weighted_sum_embedding pad={pad}")


def case_project_embedding(d, backend):
    N, dim = _dims(d, 1, 6, "N"), _dims(d, 0, 5, "d")
    B, T = _embedding_inputs(d)
    pad, m = _padding(d, N), d.pick((None, 1, 2, 3), "m")
    idx = d.index((B, T), N, "idx")
    E, E64 = d.tensor((B, T, dim), "E")
    V, V64 = d.tensor(((m,) if m else ()) + (N, dim), "V")
    out = lk.project_embedding(idx, E, V, pad, backend=backend)
    Vf = (V64 if m else V64[None]).flatten(1)
    G, Ga = (embedding_grads(idx, x, N, pad).flatten(1) for x in (E64, E64.abs()))
    exact, M = G @ Vf.T, Ga @ Vf.abs().T
    if m is None:
        exact, M = exact[:, 0], M[:, 0]
    _check(out, exact, M, T * dim + dim + T + 3, d.dtype, f"project_embedding pad={pad}")


# ---- woodbury_solve --------------------------------------------------------------------------

def _ladder(lam, jitter, s, p, dtype):
    """λ + (jitter·s)·10^p in dtype, as the op documents it (float64 value)."""
    shift = torch.tensor(jitter, dtype=dtype) * torch.tensor(s, dtype=torch.float64).to(dtype)
    for _ in range(p):
        shift = shift * 10
    return float(torch.tensor(lam, dtype=dtype) + shift)


def _classify(A, u):
    """For a float64 symmetric A: 0 when clearly positive definite, k (1 ≤ k ≤ n) the order of
    the first leading minor clearly not positive definite, None where rounding decides.
    Cholesky in unit roundoff u succeeds when λ_min > 20 n^1.5 u ‖A‖ (Higham Thm 10.7) and
    fails when λ_min < −n γ_{n+1} ‖A‖/(1 − n γ_{n+1}) (a computed factor is exact for A + ΔA)."""
    n = A.shape[-1]
    if n == 0:
        return 0
    norm = float(torch.linalg.matrix_norm(A, 2))
    tol = max(20 * n ** 1.5 * u, 2 * n * gamma(n + 1, u) / (1 - n * gamma(n + 1, u))) * norm
    for k in range(1, n + 1):
        low = float(torch.linalg.eigvalsh(A[:k, :k])[0])
        if abs(low) <= tol:
            return None
        if low < 0:
            return k
    return 0


def case_woodbury_solve(d, backend):
    dtype, u = d.dtype, U[d.dtype]
    batched = d.bool("batched")
    b = _dims(d, 0, 3, "b") if batched else 1
    n, r = _dims(d, 0, 6, "n"), d.pick((None, 1, 2, 3), "r")
    max_tries = d.int(0, 4, "max_tries")
    jitter = d.pick((None, 0.0, 1e-4, 1e-3, 1e-2, 1e-1), "jitter")
    j = {torch.float32: 1e-6, torch.float64: 1e-12}[dtype] if jitter is None else jitter
    g = torch.Generator().manual_seed(d.int(0, 2 ** 31 - 1, "K.seed"))
    scale = 2.0 ** d.int(-3, 3, "K.scale_exp")
    lams, Ks, kinds = [], [], []
    for i in range(b):
        kind = d.pick(("spd", "spd", "indefinite", "ladder", "nonfinite", "bad_damping"),
                      f"kind{i}") if n else "spd"
        lam = d.pick((0.0, 1e-3, 0.1, 1.0), f"lam{i}")
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        eig = torch.exp(torch.rand(n, generator=g, dtype=torch.float64) * 4 - 3)
        if kind in ("indefinite", "ladder") and n:
            target = d.int(0, max(max_tries, 1), f"rung{i}") if kind == "ladder" else 0
            # −λ_min = λ + c(P − μ) ⇒ μ = (λ + cP)/(1 + c), c = j·10^(target−½)/n (K_ii > 0):
            # λ_min + λ_target sits a factor √10 from 0 on either side of rung `target`.
            c = j * 10 ** (target - 0.5) / n
            P = float(eig[1:].sum()) if n > 1 else 0.0
            mu = (lam + c * P) / (1 + c) if kind == "ladder" else float(eig.max()) * 0.5 + lam
            eig[0] = -max(mu, 1e-3)
        K = (Q * eig) @ Q.T * scale
        Ks.append((K + K.T) / 2)
        lams.append(lam * scale)
        kinds.append(kind)
    K64 = torch.stack(Ks) if b else torch.zeros(0, n, n, dtype=torch.float64)
    K = K64.to(dtype)
    garbage = d.pick(("none", "random", "nan"), "upper_triangle")
    upper = torch.ones(n, n, dtype=torch.bool).triu(1)
    if garbage == "random":
        K = torch.where(upper, torch.randn(b, n, n, generator=g, dtype=torch.float64).to(dtype), K)
    elif garbage == "nan":
        K = torch.where(upper, torch.full((), float("nan"), dtype=dtype), K)
    R64 = torch.randn(b, n, r or 1, generator=g, dtype=torch.float64).to(dtype)
    R = R64.clone()
    lam_t = torch.tensor(lams, dtype=torch.float64)
    for i, kind in enumerate(kinds):
        if kind == "nonfinite":
            if d.bool(f"nonfinite_in_K{i}"):
                K[i, n - 1, 0] = d.pick((float("nan"), float("inf")), f"bad{i}")
            else:
                R[i, 0, 0] = float("nan")
        if kind == "bad_damping":
            lam_t[i] = d.pick((-1.0, float("nan"), float("inf")), f"bad_lam{i}")
    uniform = all(k != "bad_damping" for k in kinds) and len(set(lams)) <= 1
    damping_kind = d.pick(("tensor_b", "float", "scalar_tensor"), "damping") if uniform \
        else "tensor_b"
    lam0 = lams[0] if lams else 0.5
    if damping_kind == "tensor_b":  # one per member ((1,) for an unbatched K)
        damping = lam_t.to(d.pick((dtype, torch.float64), "damping.dtype"))
    elif damping_kind == "float":
        damping = lam0
    else:
        damping = torch.tensor(lam0, dtype=d.pick((dtype, torch.float64), "damping.dtype"))
    Rin = R if r is not None else R[..., 0]
    Kin, Rin = (K, Rin) if batched else (K[0], Rin[0])
    X, info, used = lk.woodbury_solve(Kin, damping, Rin, jitter=jitter, max_tries=max_tries,
                                      backend=backend)
    assert X.shape == Rin.shape and X.dtype == dtype, f"X {X.dtype} {tuple(X.shape)}"
    assert info.dtype == torch.int32 and info.shape == ((b,) if batched else ()), "info shape"
    assert used.dtype == dtype and used.shape == info.shape, "damping_used shape/dtype"
    Xb = X if r is not None else X[..., None]
    Xb, info, used = (Xb, info, used) if batched else (Xb[None], info[None], used[None])
    lam_given = torch.as_tensor(damping, dtype=torch.float64).expand(b)
    L = torch.tril(K.double().nan_to_num(0.0, 0.0, 0.0)) if n else K.double()
    A64 = L + torch.tril(L, -1).mT
    for i, kind in enumerate(kinds):
        what = f"member {i} ({kind})"
        lam_i = float(lam_given[i])
        if kind == "bad_damping":
            assert int(info[i]) == -3, f"{what}: info {int(info[i])}, expected -3"
        elif kind == "nonfinite":
            assert int(info[i]) == -1, f"{what}: info {int(info[i])}, expected -1"
        if kind in ("bad_damping", "nonfinite"):
            assert (Xb[i] == 0).all(), f"{what}: X must be 0"
            continue
        s = float(A64[i].diagonal().abs().sum()) / max(n, 1)
        s = s if s > 0 else 1.0
        rungs = [float(torch.tensor(lam_i, dtype=dtype))] + \
            ([_ladder(lam_i, j, s, p, dtype) for p in range(max_tries)] if j > 0 else [])
        eye = torch.eye(n, dtype=torch.float64)
        expected = None
        for rung, lam_p in enumerate(rungs):
            cls = _classify(A64[i] + lam_p * eye, u)
            if cls is None:
                expected = None
                break
            expected = (cls, lam_p)
            if cls == 0:
                break
        got_info, got_used = int(info[i]), float(used[i])
        note(f"{what}: info {got_info}, used {got_used}, expected {expected}, rungs {rungs}")
        if expected is not None:
            assert got_info == expected[0], f"{what}: info {got_info}, expected {expected[0]}"
            assert abs(got_used - expected[1]) <= 8 * u * abs(expected[1]) + 1e-300, \
                f"{what}: damping_used {got_used}, expected {expected[1]}"
        if got_info != 0:
            assert got_info > 0 or expected is None, f"{what}: info {got_info}"
            assert (Xb[i] == 0).all(), f"{what}: X must be 0 where info != 0"
            continue
        A = A64[i] + got_used * eye
        if n == 0:
            continue
        ev = torch.linalg.eigvalsh(A)
        kappa = float(ev[-1] / ev[0]) if float(ev[0]) > 0 else math.inf
        eps = n * gamma(3 * n + 1, u) / (1 - n * gamma(n + 1, u)) + u
        if kappa * eps >= 0.5:
            continue  # no a priori forward bound: only the contract (info, finiteness) above
        # float64 oracle by a dense Cholesky solve (torch.linalg): within the same bound of
        # the exact x, which for float64 X is added (the bound below doubles).
        x = torch.cholesky_solve(R64[i].double(), torch.linalg.cholesky(A))
        err = torch.linalg.vector_norm(Xb[i].double() - x, dim=0)
        bound = kappa * eps / (1 - kappa * eps) * torch.linalg.vector_norm(x, dim=0) + 1e-300
        if dtype == torch.float64:
            bound = 2 * bound
        assert bool((err <= bound).all()), \
            f"{what}: forward error {err.tolist()} exceeds {bound.tolist()} (κ = {kappa:.3g})"


# ---- sketches --------------------------------------------------------------------------------

def _seed(d):
    return d.pick((0, 1, 12345, 2 ** 32 - 1, 2 ** 32, 2 ** 63 - 1), "seed") \
        if d.bool("seed.special") else d.int(0, 2 ** 63 - 1, "seed")


def _omega_slack(backend, rademacher):
    """Per-entry error of a backend's Ω against the reference's, in units of u32·|Ω|: none on
    CPU (reference, native C++ and Triton's interpreter give the same bits, as documented)."""
    return 0.0


def case_sketch_omega(d, backend):
    L, k = _dims(d, 0, 6, "len(rows)"), _dims(d, 0, 9, "k")
    big = d.pick((8, 2 ** 31, 2 ** 33, 2 ** 62), "rows.range")
    gen = torch.Generator().manual_seed(d.int(0, 2 ** 31 - 1, "rows.seed"))
    values = torch.randint(0, big, (L,), generator=gen, dtype=torch.int64)
    layout = d.pick(("contiguous", "strided", "expanded"), "rows.layout")
    if layout == "strided":
        wide = torch.zeros(2 * L + 1, dtype=torch.int64)
        wide[1::2] = values
        rows = wide[1::2]
    elif layout == "expanded" and L:
        rows = values[:1].expand(L)
    else:
        rows = values
    seed_, dist, col_offset = _seed(d), d.pick(("gaussian", "rademacher"), "dist"), \
        4 * d.int(0, 3, "col_offset/4")
    out = lk.sketch_omega(rows, k, seed_, dist, col_offset, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (L, k), f"{out.dtype} {tuple(out.shape)}"
    rademacher = dist == "rademacher"
    # The same bits from every backend on CPU ...
    same = reference_omega(rows.contiguous(), k, seed_, rademacher, col_offset)
    assert torch.equal(out, same), "Ω must equal the reference's bit for bit"
    # ... and the definition: exact signs, or within 4 float32 ulps of the float64 formula.
    exact = omega_python(rows.tolist(), list(range(col_offset, col_offset + k)), seed_,
                         rademacher)
    if rademacher:
        assert torch.equal(out.double(), exact), "Rademacher Ω must be exact"
    else:
        assert_within(out, exact, 4 * ulp32(exact), f"sketch_omega {dist} (4 ulp)")


def case_sketch_matmul(d, backend):
    m, n, k = _dims(d, 0, 6, "m"), _dims(d, 0, 6, "n"), _dims(d, 1, 9, "k")
    transpose = d.bool("transpose")
    M, M64 = d.tensor((m, n), "M")
    seed_, dist = _seed(d), d.pick(("gaussian", "rademacher"), "dist")
    row_offset = d.pick((0, 3, 2 ** 32 - 2), "row_offset")
    out = lk.sketch_matmul(M, k, seed_, dist, transpose, row_offset, backend=backend)
    inner = m if transpose else n
    rows = torch.arange(row_offset, row_offset + inner, dtype=torch.int64)
    Om = reference_omega(rows, k, seed_, dist == "rademacher").double()  # inner × k
    exact, mag = (Om.T @ M64, Om.abs().T @ M64.abs()) if transpose else \
        (M64 @ Om, M64.abs() @ Om.abs())
    _check(out, exact, mag, inner + 2, d.dtype, f"sketch_matmul {dist} T={transpose}",
           extra=_omega_slack(backend, dist == "rademacher"))


# ---- fwht and subspaces ----------------------------------------------------------------------

def case_fwht(d, backend):
    lead = tuple(_dims(d, 0, 3, f"lead{i}") for i in range(d.int(0, 2, "lead dims")))
    n = 2 ** d.int(0, 6, "log2 n")
    x, x64 = d.tensor(lead + (n,), "x", scale_exp=(-3, 3))
    y = lk.fwht(x, backend=backend)
    H = hadamard(n)
    exact = x64 @ H.T
    mag = x64.abs().sum(-1, keepdim=True).expand(exact.shape)
    _check(y, exact, mag, max(n.bit_length() - 1, 1), d.dtype, f"fwht n={n}", out_dtype=d.dtype,
           oracle_n=n)  # the oracle: a dense length-n dot per output


def case_subspace_project(d, backend):
    D, k = _dims(d, 0, 40, "D"), _dims(d, 0, 6, "k")
    P, P64 = d.tensor((D, k), "P")
    g, g64 = d.tensor((D,), "g")
    c = lk.subspace_project(P, g, backend=backend)
    _check(c, P64.T @ g64, P64.abs().T @ g64.abs(), D + 2, d.dtype, "subspace_project")


def _base(d, D):
    if not d.bool("base"):
        return None, None
    dtype = d.dtype if d.dtype == torch.float64 else d.pick((d.dtype, torch.float32), "base.dtype")
    return d.tensor((D,), "base", dtype=dtype, scale_exp=(-3, 3))


def case_subspace_expand(d, backend):
    D, k = _dims(d, 0, 40, "D"), _dims(d, 0, 6, "k")
    P, P64 = d.tensor((D, k), "P", scale_exp=(-3, 3))
    a, a64 = d.tensor((k,), "alpha", scale_exp=(-3, 3))
    base, base64 = _base(d, D)
    w = lk.subspace_expand(P, a, base, backend=backend)
    exact, mag = P64 @ a64, P64.abs() @ a64.abs()
    if base is not None:
        exact, mag = exact + base64, mag + base64.abs()
    _check(w, exact, mag, k + 2, d.dtype, "subspace_expand",
           out_dtype=P.dtype if base is None else base.dtype)


def case_random_subspace_project(d, backend):
    D, dim = _dims(d, 0, 40, "D"), _dims(d, 0, 6, "d")
    g, g64 = d.tensor((D,), "g")
    seed_, dist = _seed(d), d.pick(("gaussian", "rademacher"), "dist")
    s = d.pick((0.0, 1.0, -0.5, 0.1234567), "scale")
    c = lk.random_subspace_project(g, seed_, dim, s, dist, backend=backend)
    Om = reference_omega(torch.arange(D), dim, seed_, dist == "rademacher").double()
    _check(c, s * (Om.T @ g64), abs(s) * (Om.abs().T @ g64.abs()), D + 3, d.dtype,
           f"random_subspace_project {dist}", extra=_omega_slack(backend, dist == "rademacher"))


def case_random_subspace_expand(d, backend):
    D, dim = _dims(d, 0, 40, "D"), _dims(d, 0, 6, "d")
    a, a64 = d.tensor((dim,), "alpha", scale_exp=(-3, 3))
    base, base64 = _base(d, D)
    seed_, dist = _seed(d), d.pick(("gaussian", "rademacher"), "dist")
    s = d.pick((0.0, 1.0, -0.5, 0.1234567), "scale")
    w = lk.random_subspace_expand(a, seed_, D, s, dist, base, backend=backend)
    Om = reference_omega(torch.arange(D), dim, seed_, dist == "rademacher").double()
    exact, mag = s * (Om @ a64), abs(s) * (Om.abs() @ a64.abs())
    if base is not None:
        exact, mag = exact + base64, mag + base64.abs()
    _check(w, exact, mag, dim + 3, d.dtype, f"random_subspace_expand {dist}",
           out_dtype=acc_dtype(d.dtype) if base is None else base.dtype,
           extra=_omega_slack(backend, dist == "rademacher"))


CASES = {name[len("case_"):]: fn for name, fn in globals().items() if name.startswith("case_")}

# Examples per (op, backend, dtype) in the default run; Triton (the interpreter) gets fewer.
EXAMPLES = {"gram_linear": 30, "gram_conv2d": 20, "gram_embedding": 30,
            "weighted_sum_linear": 20, "weighted_sum_conv2d": 16, "weighted_sum_embedding": 20,
            "project_linear": 20, "project_conv2d": 16, "project_embedding": 20,
            "woodbury_solve": 60, "sketch_omega": 50, "sketch_matmul": 24, "fwht": 20,
            "subspace_project": 16, "subspace_expand": 16, "random_subspace_project": 16,
            "random_subspace_expand": 16}
TRITON_EXAMPLES = 8


def _dtypes(op):
    """The input dtypes op's backends are declared for on CPU (the float dtypes of the layer
    tensors; sketch_omega's int64 rows)."""
    return [d for d in (*DTYPES, torch.int64)
            if any(d in b.dtypes.get("cpu", ()) for b in lk.REGISTRY[op].backends.values())]


def _params():
    out = []
    for op in sorted(CASES):
        for dtype in _dtypes(op):
            name = NAMES.get(dtype, str(dtype).replace("torch.", ""))
            for backend in backends_for(op, "cpu", dtype):
                out.append(pytest.param(op, backend, dtype, id=f"{op}-{backend}-{name}"))
    return out


PARAMS = _params()


def test_every_op_is_fuzzed():
    assert set(CASES) == set(lk.REGISTRY), set(lk.REGISTRY) ^ set(CASES)
    assert set(EXAMPLES) == set(CASES)
    fuzzed = {(p.values[0], p.values[1]) for p in PARAMS}
    for op in CASES:  # every backend that runs here, on some dtype
        runnable = {b for d in _dtypes(op) for b in backends_for(op, "cpu", d)}
        assert "reference" in runnable, f"{op}: the reference is not fuzzed"
        assert {(op, b) for b in runnable} <= fuzzed, op


class _Summary:
    """Prints the counts at the end of the session (a plugin registered by the first test)."""

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.write_line(
            f"fuzz summary: {STATS['cases']} cases, {STATS['mismatches']} mismatches, "
            f"{STATS['crashes']} crashes")


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    plugin = _Summary()
    if not request.config.pluginmanager.is_registered(plugin):
        request.config.pluginmanager.register(plugin, "fuzz-summary")
    yield


@pytest.mark.parametrize("op,backend,dtype", PARAMS)
def test_fuzz(op, backend, dtype, fuzz_long):
    examples = TRITON_EXAMPLES if backend == "triton" else EXAMPLES[op]
    examples *= LONG_FACTOR if fuzz_long else 1
    run = CASES[op]

    @seed(zlib.crc32(f"{op}-{backend}-{dtype}".encode()))
    @settings(max_examples=examples, database=None, deadline=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def fuzz(data):
        STATS["cases"] += 1
        # Force the backend by argument, or by the use_backend mode (backend=None in the call).
        by_mode = data.draw(st.booleans(), label="use_backend mode")
        try:
            if by_mode:
                with lk.use_backend(backend):
                    run(Draw(data, dtype), None)
            else:
                run(Draw(data, dtype), backend)
        except AssertionError:
            STATS["mismatches"] += 1
            raise
        except Exception:
            STATS["crashes"] += 1
            raise

    fuzz()


@pytest.mark.parametrize("op", ["weighted_sum_linear", "weighted_sum_conv2d"])
def test_fp16_weighted_sum_of_one_term(op):
    """Triton fp16 weighted sum of one term c·e, below fp16's normal range (issue 12 item 7:
    it was rounded to fp16 pieces): fp32 accumulation makes it exact."""
    if "triton" not in backends_for(op, "cpu", torch.float16):
        pytest.skip("Triton does not run here")
    c, e = torch.tensor([1e-3]).half(), torch.tensor([1e-3]).half()
    exact = c.double() * e.double()
    if op == "weighted_sum_linear":
        W, b = lk.weighted_sum_linear(torch.ones(1, 1).half(), e[:, None], c, True,
                                      backend="triton")
    else:
        W, b = lk.weighted_sum_conv2d(torch.ones(1, 1, 1, 1).half(), e.reshape(1, 1, 1, 1), c,
                                      [1, 1], bias=True, backend="triton")
    assert_within(W.flatten(), exact, coeff(3, torch.float16) * exact.abs(), f"{op} W")
    assert_within(b.flatten(), exact, coeff(3, torch.float16) * exact.abs(), f"{op} bias")


def test_fp16_weighted_sum_embedding_of_one_term():
    """fp32 coefficients are not cut to 22 bits (two fp16 pieces) for fp16 E."""
    if "triton" not in backends_for("weighted_sum_embedding", "cpu", torch.float16):
        pytest.skip("Triton does not run here")
    E, c = torch.tensor([[[1.541015625]]]).half(), torch.tensor([-0.049143463373184204])
    out = lk.weighted_sum_embedding(torch.zeros(1, 1, dtype=torch.long), E, c, 1,
                                    backend="triton")
    exact = (c.double() * E.double()[0, 0]).reshape(1, 1)
    assert_within(out, exact, coeff(3, torch.float16) * exact.abs(), "weighted_sum_embedding")
