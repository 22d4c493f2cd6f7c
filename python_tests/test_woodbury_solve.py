"""woodbury_solve: X = (K + λ'I)⁻¹ R against a float64 dense solve (torch.linalg.solve of the
symmetrized, damped matrix), with Cholesky's error bounds, and its failure contract (info codes,
jitter ladder for the failing members only, zeros instead of NaN, lower triangle only).

Bounds (Higham, Accuracy and Stability, §10.1): the computed x̂ solves (A + ΔA) x̂ = r with
‖ΔA‖ ≤ c·n·u·‖A‖, so the backward error ‖A x̂ − r‖/(‖A‖‖x̂‖) ≤ c·n·u whatever κ(A), and the
forward error ‖x̂ − x‖/‖x‖ ≤ c·n·u·κ(A) (to first order). c = 4 below; u is the unit roundoff of
the input dtype; A, κ and x are computed in float64 from the rounded inputs.
"""
import time

import pytest
import torch
from conftest import DEVICES, device_backend_params

import lowrank_kernels as lk
from lowrank_kernels.ops.woodbury_solve import INFO_NONFINITE, INFO_OVERFLOW
from lowrank_kernels.reference.woodbury_solve import _jitter_shift, default_jitter

DTYPES = [torch.float32, torch.float64]
UNIT = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}
C = 4.0
NATIVE = lk.native_build_info() != "not built"


pytestmark = pytest.mark.usefixtures("one_thread")


def _dtype_id(d):
    return str(d).replace("torch.", "")


def _spd(b, n, cond, dtype, device="cpu", seed=0):
    """b SPD matrices Q diag(λ) Qᵀ with eigenvalues log-spaced in [1/cond, 1], in dtype."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(b, n, n, generator=g, dtype=torch.float64))
    eig = torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), n,
                         dtype=torch.float64)
    eig = eig[torch.randperm(n, generator=g)]
    K = (Q * eig) @ Q.mT
    return ((K + K.mT) / 2).to(device=device, dtype=dtype)


def _rhs(b, n, r, dtype, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, r, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def _damped64(K, lam):
    """float64 A = tril(K) + tril(K, −1)ᵀ + λI (only the lower triangle of K is used)."""
    L = torch.tril(torch.nan_to_num(K.double().cpu(), nan=0.0))
    A = L + torch.tril(L, -1).mT
    lam = torch.as_tensor(lam, dtype=torch.float64).reshape(-1, 1, 1) if A.dim() == 3 else lam
    return A + lam * torch.eye(A.shape[-1], dtype=torch.float64)


def _check_accuracy(K, used, R, X, what, spectrum=None):
    """Backward error ≤ c·n·u and forward error ≤ c·n·u·κ per member against float64.
    spectrum: (lo, hi) bounds of the eigenvalues of the damped matrix when known a priori
    (else computed)."""
    u, n = UNIT[K.dtype], K.shape[-1]
    A = _damped64(K, used.double().cpu())
    R64, X64 = R.double().cpu(), X.double().cpu()
    exact = torch.linalg.solve(A, R64)
    if spectrum is None:
        norm_A = torch.linalg.matrix_norm(A, ord=2)
        kappa = torch.linalg.cond(A)
    else:  # the smaller ‖A‖ makes the backward-error test the stricter one
        norm_A = torch.full((A.shape[0],), spectrum[0], dtype=torch.float64)
        kappa = torch.full((A.shape[0],), spectrum[1] / spectrum[0], dtype=torch.float64)
    bwd = torch.linalg.matrix_norm(A @ X64 - R64) / (norm_A * torch.linalg.matrix_norm(X64))
    fwd = torch.linalg.matrix_norm(X64 - exact) / torch.linalg.matrix_norm(exact)
    for i in range(A.shape[0]):
        assert bwd[i] <= C * n * u, f"{what}[{i}]: backward error {bwd[i]:.2e} > {C * n * u:.2e}"
        bound = C * n * u * kappa[i]
        assert fwd[i] <= bound, (f"{what}[{i}]: forward error {fwd[i]:.2e} > {bound:.2e} "
                                 f"(κ={kappa[i]:.1e})")


# ---- accuracy ----------------------------------------------------------------------------

SHAPES = [(1, 1, 1), (1, 7, 3), (3, 33, 1), (2, 130, 16), (4, 64, 5)]


@pytest.mark.parametrize("device,backend", device_backend_params("woodbury_solve"))
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_well_conditioned(device, backend, dtype, shape):
    b, n, r = shape
    K, R = _spd(b, n, 1e2, dtype, device, seed=n), _rhs(b, n, r, dtype, device)
    lam = torch.linspace(0.0, 0.5, b, dtype=dtype, device=device)
    X, info, used = lk.woodbury_solve(K, lam, R, backend=backend)
    assert X.shape == R.shape and X.dtype == dtype and info.dtype == torch.int32
    assert info.tolist() == [0] * b and torch.equal(used, lam)
    _check_accuracy(K, used, R, X, f"{backend} {dtype} {shape}")


@pytest.mark.parametrize("device,backend", device_backend_params("woodbury_solve"))
@pytest.mark.parametrize("dtype,cond", [(torch.float32, 1e6), (torch.float64, 1e12)],
                         ids=["fp32-1e6", "fp64-1e12"])
@pytest.mark.parametrize("n", [33, 130])
def test_ill_conditioned(device, backend, dtype, cond, n):
    K, R = _spd(2, n, cond, dtype, device, seed=7), _rhs(2, n, 2, dtype, device)
    X, info, used = lk.woodbury_solve(K, 0.0, R, backend=backend)
    assert (info == 0).all(), info
    # If rounding made K + 0·I numerically indefinite the ladder may have added a rung: the
    # contract is that damping_used is 0 or a rung and that X solves with it.
    scale = K.diagonal(dim1=-2, dim2=-1).double().abs().mean(-1).cpu()
    allowed = [torch.zeros(2, dtype=dtype)] + [
        _jitter_shift(default_jitter(dtype), p, scale, dtype) for p in range(4)]
    for i in range(2):
        assert any(torch.isclose(used[i].cpu(), a[i], rtol=16 * UNIT[dtype], atol=0)
                   for a in allowed), f"damping_used {used[i]} is neither 0 nor a rung"
    _check_accuracy(K, used, R, X, f"{backend} {dtype} κ={cond:.0e}")


@pytest.mark.parametrize("device,backend", device_backend_params("woodbury_solve"))
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_singular_gram_needs_damping(device, backend, dtype):
    """K = UᵀU of rank 5 < n: singular without damping; λ > 0 makes it well posed."""
    n, rank = 33, 5
    g = torch.Generator().manual_seed(3)
    U = torch.randn(3, rank, n, generator=g, dtype=torch.float64)
    K = (U.mT @ U).to(device=device, dtype=dtype)
    R = _rhs(3, n, 4, dtype, device)
    X, info, used = lk.woodbury_solve(K, 0.1, R, backend=backend)
    assert info.tolist() == [0, 0, 0] and (used == 0.1).all()
    _check_accuracy(K, used, R, X, f"{backend} {dtype} rank-deficient Gram")
    # Without damping and without the ladder it fails, is reported, and X is zero.
    R2 = R[:, :, 0]
    X0, info0, used0 = lk.woodbury_solve(K, 0.0, R2, max_tries=0, backend=backend)
    assert ((info0 > rank) & (info0 <= n)).all(), info0  # minors of order ≤ rank are PD
    assert (X0 == 0).all() and (used0 == 0).all()


# ---- failure contract -------------------------------------------------------------------

def _batch_with_failures(dtype, device, n=37, r=3):
    """Members 0, 3: SPD; 1: mildly indefinite (the ladder fixes it); 2: a leading minor of
    order 6 hopelessly indefinite; 4: NaN in the lower triangle; 5: Inf in R."""
    K = _spd(6, n, 1e3, dtype, device, seed=11)
    K[1] -= 2e-3 * torch.eye(n, dtype=dtype, device=device)  # λ_min(K[1]) = 1e-3 − 2e-3 < 0
    K[2, 5, 5] = -1e4
    K[4, 20, 3] = float("nan")
    R = _rhs(6, n, r, dtype, device, seed=12)
    R[5, 7, 1] = float("inf")
    return K, R


@pytest.mark.parametrize("device,backend", device_backend_params("woodbury_solve"))
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_failures_and_jitter_ladder(device, backend, dtype):
    K, R = _batch_with_failures(dtype, device)
    n, lam, jitter, tries = K.shape[-1], 1e-4, 1e-4, 4
    X, info, used = lk.woodbury_solve(K, lam, R, jitter=jitter, max_tries=tries, backend=backend)
    lam_t = torch.tensor(lam, dtype=dtype)
    scale = K.diagonal(dim1=-2, dim2=-1).double().abs().mean(-1).cpu()
    rungs = [lam_t + _jitter_shift(jitter, p, scale, dtype) for p in range(tries)]
    assert torch.isfinite(X).all(), "the op never returns NaN/Inf"
    # 1: info 0 with a rung of the ladder; the rung before it (or λ) really fails.
    assert info[1] == 0
    p = next(i for i in range(tries)
             if torch.isclose(used[1].cpu(), rungs[i][1], rtol=16 * UNIT[dtype]))
    below = lam_t if p == 0 else rungs[p - 1][1]
    A_below = _damped64(K[1:2].cpu(), below.double()).to(dtype)
    assert torch.linalg.cholesky_ex(A_below)[1] > 0
    _check_accuracy(K[1:2], used[1:2], R[1:2], X[1:2], f"{backend} jittered member")
    # 2: every rung fails at the leading minor of order 6; damping_used is the last rung.
    assert info[2] == 6 and torch.isclose(used[2].cpu(), rungs[-1][2], rtol=16 * UNIT[dtype])
    assert (X[2] == 0).all()
    # 4, 5: non-finite input, reported, zeros, damping untouched.
    assert info[4] == INFO_NONFINITE and info[5] == INFO_NONFINITE
    assert (X[4:] == 0).all() and (used[4:] == lam_t.to(device)).all()
    # 0, 3: solved at λ, and bit-for-bit what they are when solved alone (native: each member
    # is independent arithmetic; the reference's LAPACK (MKL) rounds differently depending on a
    # matrix's alignment in memory, so there only the error bound is checked).
    assert info[0] == 0 and info[3] == 0 and (used[[0, 3]] == lam_t.to(device)).all()
    for i in (0, 3):
        Xi, infoi, usedi = lk.woodbury_solve(K[i], lam, R[i], jitter=jitter, max_tries=tries,
                                             backend=backend)
        assert infoi == 0 and usedi == used[i]
        if backend == "native":
            assert torch.equal(Xi, X[i])
        _check_accuracy(K[i:i + 1], used[i:i + 1], R[i:i + 1], Xi[None], f"{backend} alone")
    _check_accuracy(K[[0, 3]], used[[0, 3]], R[[0, 3]], X[[0, 3]], f"{backend} healthy members")


@pytest.mark.skipif(not NATIVE, reason="native extension not built")
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_native_and_reference_share_the_contract(dtype):
    K, R = _batch_with_failures(dtype, "cpu")
    ours = lk.woodbury_solve(K, 1e-4, R, jitter=1e-4, backend="native")
    ref = lk.woodbury_solve(K, 1e-4, R, jitter=1e-4, backend="reference")
    assert torch.equal(ours.info, ref.info)
    torch.testing.assert_close(ours.damping_used, ref.damping_used, rtol=16 * UNIT[dtype], atol=0)
    # The rung is the same up to the summation order of s = mean|K_ii| (a few ulps).
    for res in (ours, ref):
        assert (res.X[res.info != 0] == 0).all()
        ok = res.info == 0
        _check_accuracy(K[ok], res.damping_used[ok], R[ok], res.X[ok], "shared contract")


@pytest.mark.parametrize("device,backend", device_backend_params("woodbury_solve"))
def test_overflow_is_reported_not_returned(device, backend):
    n = 9
    K = torch.eye(n, device=device) * 1e-30
    R = torch.full((n, 2), 1e30, device=device)
    X, info, used = lk.woodbury_solve(K, 0.0, R, backend=backend)
    assert info == INFO_OVERFLOW and (X == 0).all() and info.shape == ()


@pytest.mark.parametrize("device,backend", device_backend_params("woodbury_solve"))
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_upper_triangle_is_never_read(device, backend, dtype):
    K, R = _spd(3, 45, 1e2, dtype, device, seed=5), _rhs(3, 45, 2, dtype, device)
    poisoned = K.clone()
    upper = torch.ones(45, 45, dtype=torch.bool, device=device).triu(1)
    poisoned[:, upper] = float("nan")
    clean = lk.woodbury_solve(K, 0.01, R, backend=backend)
    dirty = lk.woodbury_solve(poisoned, 0.01, R, backend=backend)
    assert (dirty.info == 0).all()
    assert torch.equal(clean.X, dirty.X) and torch.equal(clean.damping_used, dirty.damping_used)


# ---- shapes, layouts, sizes -------------------------------------------------------------

@pytest.mark.parametrize("device,backend", device_backend_params("woodbury_solve"))
def test_shapes_and_damping_forms(device, backend):
    # LAPACK (the reference) may round a lone right-hand side differently from a block of them.
    def _same(a, b):
        return torch.equal(a, b) if backend == "native" else torch.allclose(a, b, rtol=1e-13)

    K, R = _spd(4, 17, 10, torch.float64, device), _rhs(4, 17, 3, torch.float64, device)
    full = lk.woodbury_solve(K, torch.full((4,), 0.2, dtype=torch.float64, device=device), R,
                             backend=backend)
    vec = lk.woodbury_solve(K, torch.tensor(0.2, dtype=torch.float64, device=device), R[:, :, 1],
                            backend=backend)
    assert vec.X.shape == (4, 17) and _same(vec.X, full.X[:, :, 1])
    one = lk.woodbury_solve(K[2], 0.2, R[2], backend=backend)
    assert one.X.shape == (17, 3) and one.info.shape == () and one.damping_used.shape == ()
    assert _same(one.X, full.X[2]) and one.info == 0
    single = lk.woodbury_solve(K[2], 0.2, R[2, :, 0], backend=backend)
    assert single.X.shape == (17,) and _same(single.X, full.X[2, :, 0])
    assert full.info.shape == (4,) and full.damping_used.dtype == torch.float64


@pytest.mark.parametrize("device,backend", device_backend_params("woodbury_solve"))
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_noncontiguous_inputs(device, backend, dtype):
    big = _spd(6, 50, 1e2, dtype, device, seed=9)
    K = big[::2].mT  # strided batch, transposed (still symmetric: same matrix)
    Rt = _rhs(3, 4, 50, dtype, device)
    R = Rt.mT[:, :, ::2]  # column-major, every other column
    lam = torch.tensor([0.1, 0.0, 0.3, 9.0, 0.2, 9.0], dtype=dtype, device=device)[::2]
    assert not (K.is_contiguous() or R.is_contiguous() or lam.is_contiguous())
    X, info, used = lk.woodbury_solve(K, lam, R, backend=backend)
    assert (info == 0).all() and torch.equal(used, lam)
    torch.testing.assert_close(X, lk.woodbury_solve(K.contiguous(), lam.contiguous(),
                                                    R.contiguous(), backend=backend).X,
                               rtol=0, atol=0)
    _check_accuracy(K, used, R, X, f"{backend} non-contiguous")


@pytest.mark.parametrize("device,backend", device_backend_params("woodbury_solve"))
@pytest.mark.parametrize("b,n,r", [(0, 5, 2), (3, 0, 2), (3, 5, 0)])
def test_empty_dimensions(device, backend, b, n, r):
    K = torch.eye(n, device=device).expand(b, n, n) * 2
    X, info, used = lk.woodbury_solve(K, 0.5, torch.ones(b, n, r, device=device), backend=backend)
    assert X.shape == (b, n, r) and info.tolist() == [0] * b and used.tolist() == [0.5] * b
    # r = 0 still factors: an indefinite K is reported.
    bad = lk.woodbury_solve(-K, 0.0, torch.ones(b, n, r, device=device), max_tries=0,
                            backend=backend)
    assert bad.info.tolist() == [1 if n else 0] * b


@pytest.mark.skipif(not NATIVE, reason="native extension not built")
def test_n1024_native_cpu_is_fast_and_accurate():
    """K = 2I + E, E symmetric with ‖E‖₂ ≤ ‖E‖_F = 1: the spectrum lies in [1, 3] a priori."""
    n = 1024
    g = torch.Generator().manual_seed(4)
    E = torch.randn(1, n, n, generator=g, dtype=torch.float64)
    E = E + E.mT
    E /= torch.linalg.matrix_norm(E)
    K, R = 2 * torch.eye(n, dtype=torch.float64) + E, _rhs(1, n, 2, torch.float64)
    start = time.perf_counter()
    X, info, used = lk.woodbury_solve(K, 0.0, R, backend="native")
    elapsed = time.perf_counter() - start
    assert info == 0
    _check_accuracy(K, used, R, X, "native n=1024", spectrum=(1.0, 3.0))
    assert elapsed < 2.0, f"n = 1024 took {elapsed:.2f} s on the native CPU kernel"


# ---- the op machinery -------------------------------------------------------------------

def test_torch_compile_fullgraph_traces():
    K, R = _spd(2, 9, 10, torch.float32), _rhs(2, 9, 2, torch.float32)
    lam = torch.tensor([0.1, 0.2])

    def f(k, lam, r):
        X, info, used = lk.woodbury_solve(k, lam, r)
        return X * 2.0, info

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(K, lam, R), f(K, lam, R)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", [None, "reference"])
def test_bad_input_errors_name_the_argument(backend):
    K, R = _spd(2, 5, 10, torch.float32), _rhs(2, 5, 3, torch.float32)

    def solve(k=K, lam=0.1, r=R, **kw):
        return lk.woodbury_solve(k, lam, r, backend=backend, **kw)

    with pytest.raises(ValueError, match=r"K must be a 2 or 3-D tensor"):
        solve(k=K[0, 0])
    with pytest.raises(ValueError, match=r"K must be square"):
        solve(k=K[:, :, :4])
    with pytest.raises(TypeError, match=r"K must have a floating dtype \(float32, float64\)"):
        solve(k=K.half(), r=R.half())
    with pytest.raises(ValueError, match=r"R must be a 3 or 2-D tensor"):
        solve(r=R[0, 0])
    with pytest.raises(ValueError, match=r"K and R must have the same batch size"):
        solve(r=R[:1])
    with pytest.raises(ValueError, match=r"K and R must have the same size n"):
        solve(r=R[:, :4])
    with pytest.raises(ValueError, match=r"K and R must have the same dtype"):
        solve(r=R.double())
    with pytest.raises(ValueError, match=r"damping must be finite and >= 0"):
        solve(lam=-1e-3)
    with pytest.raises(ValueError, match=r"damping must have one value per batch member"):
        solve(lam=torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match=r"damping must be a 0 or 1-D tensor"):
        solve(lam=torch.zeros(2, 1))
    with pytest.raises(TypeError, match=r"damping must be a float or a tensor"):
        solve(lam="0.1")
    with pytest.raises(ValueError, match=r"jitter must be finite and >= 0"):
        solve(jitter=-1.0)
    with pytest.raises(ValueError, match=r"max_tries must be in \[0, 64\]"):
        solve(max_tries=-1)


@pytest.mark.cuda
def test_mismatched_devices():
    K, R = _spd(2, 5, 10, torch.float32), _rhs(2, 5, 3, torch.float32)
    with pytest.raises(ValueError, match=r"K and R must have the same device"):
        lk.woodbury_solve(K, 0.1, R.cuda())
    with pytest.raises(ValueError, match=r"K and damping must have the same device"):
        lk.woodbury_solve(K.cuda(), torch.tensor([0.1, 0.2]), R.cuda())


@pytest.mark.skipif(not NATIVE, reason="native extension not built")
# ---- GPU: every placement of the fused kernel's tiles and right-hand sides -----------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype,n,r", [
    pytest.param(torch.float32, 256, 16, id="fp32-n256-tiles+rhs-shared"),
    pytest.param(torch.float32, 320, 16, id="fp32-n320-tiles-shared-rhs-global"),
    pytest.param(torch.float32, 400, 16, id="fp32-n400-tiles-global-rhs-shared"),
    pytest.param(torch.float64, 200, 16, id="fp64-n200-tiles+rhs-shared"),
    pytest.param(torch.float64, 256, 1, id="fp64-n256-tiles-global-rhs-shared"),
    pytest.param(torch.float64, 1024, 64, id="fp64-n1024-tiles+rhs-global"),
])
def test_cuda_kernel_placements(dtype, n, r):
    K, R = _spd(3, n, 1e3, dtype, "cuda", seed=n), _rhs(3, n, r, dtype, "cuda")
    X, info, used = lk.woodbury_solve(K, 1e-3, R, backend="native")
    assert (info == 0).all()
    _check_accuracy(K, used, R, X, f"cuda {dtype} n={n} r={r}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_cuda_failures_match_the_reference(dtype):
    Kf, Rf = _batch_with_failures(dtype, "cuda")
    ours = lk.woodbury_solve(Kf, 1e-4, Rf, jitter=1e-4, backend="native")
    ref = lk.woodbury_solve(Kf.cpu(), 1e-4, Rf.cpu(), jitter=1e-4, backend="reference")
    assert torch.equal(ours.info.cpu(), ref.info)
    torch.testing.assert_close(ours.damping_used.cpu(), ref.damping_used, rtol=16 * UNIT[dtype],
                               atol=0)
    assert torch.isfinite(ours.X).all() and (ours.X[ours.info != 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,r", [(256, 1), (128, 16)])
def test_large_members_take_lapack_first_with_the_same_contract(n, r, dtype):
    """On CPU, large members are solved by LAPACK first (faster there) and those it cannot
    solve go through the core's ladder: the same X, info codes and damping_used as the
    reference, member by member — SPD, needing jitter, NaN in the read triangle, NaN only in
    the unread upper triangle, a bad damping, a solution that overflows."""
    g = torch.Generator().manual_seed(n + r)
    X = torch.randn(6, n, n, generator=g, dtype=torch.float64)
    K = X @ X.mT / n + 0.5 * torch.eye(n, dtype=torch.float64)
    lam = torch.full((6,), 0.1, dtype=torch.float64)
    K[1] = -K[1]  # indefinite: no rung saves it
    v = torch.randn(n, 1, generator=g, dtype=torch.float64)
    K[2] = v @ v.T  # rank one, PSD: the damping alone... and lam = 0 -> the jitter ladder
    lam[2] = 0.0
    K[3, n - 1, 0] = float("nan")  # in the read (lower) triangle
    K[4, 0, n - 1] = float("nan")  # upper triangle: never read
    lam[5] = -1.0  # a bad damping
    R = torch.randn(6, n, r, generator=g, dtype=torch.float64)
    K, R, lam = K.to(dtype), R.to(dtype), lam.to(dtype)
    got = lk.woodbury_solve(K, lam, R)
    want = lk.woodbury_solve(K, lam, R, backend="reference")
    assert torch.equal(got.info, want.info), (got.info, want.info)
    assert got.info.tolist()[3:] == [INFO_NONFINITE, 0, -3] and got.info[0] == 0
    torch.testing.assert_close(got.damping_used, want.damping_used, equal_nan=True)
    well = [0, 4]  # well conditioned (κ ≤ ~10): a dense float64 solve is the oracle
    Kw = K[well].double().tril()
    exact = torch.linalg.solve(Kw + torch.tril(Kw, -1).mT + 0.1 * torch.eye(n, dtype=torch.float64),
                               R[well].double())
    error = (got.X[well].double() - exact).norm() / exact.norm()
    assert error < (1e-4 if dtype == torch.float32 else 1e-12), error
    assert (got.X[got.info != 0] == 0).all()
