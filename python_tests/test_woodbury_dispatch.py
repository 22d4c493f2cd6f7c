"""woodbury_solve's per-call path around the solve: where a float damping lives (the CPU, so
that it costs no device sync), the damping value check (a float on the host; a tensor's
values on the device: info = -3 for a bad member, no sync; none for meta/fake tensors), that
a CPU scalar damping passed on as a view is never aliased by an output, and (GPU) no syncs.
The solve itself is tested in test_woodbury_solve.py."""
import contextlib

import pytest
import torch
from conftest import device_backend_params

import lowrank_kernels as lk
from lowrank_kernels import _capabilities as caps
from lowrank_kernels.reference.woodbury_solve import INFO_BAD_DAMPING

NATIVE = caps.native_built()
CPU_BACKENDS = [p for p in device_backend_params("woodbury_solve") if p.values[0] == "cpu"]


def _problem(b, n, r, dtype=torch.float64, device="cpu"):
    """b SPD matrices 2I + E, ‖E‖₂ ≤ ‖E‖_F ≤ 0.5, and right-hand sides."""
    g = torch.Generator().manual_seed(b * 100 + n)
    E = torch.randn(b, n, n, generator=g, dtype=torch.float64)
    E = (E + E.mT) / 4 / torch.linalg.matrix_norm(E).clamp_min(1.0)[:, None, None]
    K = 2 * torch.eye(n, dtype=torch.float64) + E
    R = torch.randn(b, n, r, generator=g, dtype=torch.float64)
    return K.to(device=device, dtype=dtype), R.to(device=device, dtype=dtype)


@pytest.mark.parametrize("device,backend", CPU_BACKENDS)
def test_float_damping_is_a_cpu_scalar_whatever_the_default_device(device, backend):
    """Under a default-device context a float damping still becomes a CPU scalar (with
    torch.set_default_device('cuda') it would otherwise be copied to the GPU and checked
    there with a sync); here the context is 'meta', which would fail the device check."""
    K, R = _problem(2, 5, 3)
    expected = lk.woodbury_solve(K, 0.25, R, backend=backend)
    with torch.device("meta"):
        got = lk.woodbury_solve(K, 0.25, R, backend=backend)
    assert got.X.device.type == "cpu" and torch.equal(got.X, expected.X)
    assert torch.equal(got.info, expected.info)
    assert torch.equal(got.damping_used, expected.damping_used)


@pytest.mark.parametrize("device,backend", CPU_BACKENDS)
@pytest.mark.parametrize("b", [3, 65])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), -1e-300],
                         ids=["nan", "inf", "-inf", "tiny-negative"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_every_bad_damping_is_reported(device, backend, b, bad, dtype):
    """A bad value in a damping tensor gives its member info = -3 and X = 0 (the others are
    solved as without it); a bad float raises, naming damping."""
    K, R = _problem(b, 2, 1, dtype)
    lam = torch.full((b,), 0.5, dtype=dtype)
    lam[-1] = bad
    if dtype == torch.float32 and bad == -1e-300:
        lam[-1] = -1e-45  # the smallest negative float32 (a subnormal)
    X, info, used = lk.woodbury_solve(K, lam, R, backend=backend)
    good = lk.woodbury_solve(K[:-1], lam[:-1], R[:-1], backend=backend)
    assert info[-1] == INFO_BAD_DAMPING and (X[-1] == 0).all()
    assert torch.equal(X[:-1], good.X) and (info[:-1] == 0).all()
    X1, info1, _ = lk.woodbury_solve(K, lam[-1], R, backend=backend)  # a CPU scalar
    assert (info1 == INFO_BAD_DAMPING).all() and (X1 == 0).all()
    if dtype == torch.float64:
        with pytest.raises(ValueError, match=r"woodbury_solve: damping must be finite"):
            lk.woodbury_solve(K, bad, R, backend=backend)  # a float


@pytest.mark.parametrize("bad", [True, "0.1", None])
def test_a_damping_of_the_wrong_type_is_refused(bad):
    K, R = _problem(2, 3, 1)
    with pytest.raises(TypeError, match="woodbury_solve: damping must be a float or a tensor"):
        lk.woodbury_solve(K, bad, R)


def test_a_float_damping_that_overflows_float32_is_refused():
    K, R = _problem(2, 3, 1, torch.float32)
    with pytest.raises(ValueError, match=r"damping 1e\+39 overflows K's dtype float32"):
        lk.woodbury_solve(K, 1e39, R)


@pytest.mark.parametrize("device,backend", CPU_BACKENDS)
@pytest.mark.parametrize("b", [3, 65])
def test_zero_and_negative_zero_damping_are_accepted(device, backend, b):
    K, R = _problem(b, 4, 2)
    lam = torch.zeros(b, dtype=torch.float64)
    lam[::2] = -0.0
    X, info, used = lk.woodbury_solve(K, lam, R, backend=backend)
    assert (info == 0).all() and torch.equal(used, lam)
    # K is symmetric with its spectrum in [1.5, 2.5]: Cholesky's forward error ≤ c·n·u·κ.
    exact = torch.linalg.solve(K, R)
    error = torch.linalg.matrix_norm(X - exact) / torch.linalg.matrix_norm(exact)
    assert (error <= 4 * 4 * 2.0 ** -53 * 2.5 / 1.5).all(), error
    for lam0 in (0.0, -0.0, torch.tensor(-0.0, dtype=torch.float64)):
        assert (lk.woodbury_solve(K, lam0, R, backend=backend).info == 0).all()


@pytest.mark.parametrize("device,backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(3, 6, 2), (6, 2), (6,)], ids=["batched", "matrix", "vector"])
def test_cpu_scalar_damping_is_never_aliased(device, backend, shape):
    """A 0-d CPU damping of K's dtype reaches the backend as a stride-0 view, not a copy:
    damping_used must still be a new tensor, and changing the damping later changes nothing."""
    K, R = _problem(shape[0] if len(shape) == 3 else 1, 6, 2)
    if len(shape) < 3:
        K, R = K[0], R[0]
        R = R if len(shape) == 2 else R[:, 0]
    lam = torch.tensor(0.125, dtype=torch.float64)
    X, info, used = lk.woodbury_solve(K, lam, R, backend=backend)
    before = used.clone()
    assert used.untyped_storage().data_ptr() != lam.untyped_storage().data_ptr()
    lam.fill_(7.0)
    assert torch.equal(used, before) and (used == 0.125).all() and (info == 0).all()
    with lk.use_backend(backend):
        torch.library.opcheck(torch.ops.lowrank_kernels.woodbury_solve.default,
                              (K, torch.tensor(0.125, dtype=torch.float64), R, None, 4))


def test_meta_and_fake_damping_are_not_read():
    """Meta and fake tensors have no values: the check only looks at shapes and dtypes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    K, R = _problem(2, 5, 3)
    meta = lk.woodbury_solve(K.to("meta"), torch.full((2,), -1.0, device="meta",
                                                     dtype=torch.float64), R.to("meta"))
    assert [t.shape for t in meta] == [(2, 5, 3), (2,), (2,)]
    with FakeTensorMode():
        Kf, Rf = torch.empty(2, 5, 5, dtype=torch.float64), torch.empty(2, 5, 3)
        for lam in (0.5, torch.tensor(0.5, dtype=torch.float64), torch.empty(2)):
            out = lk.woodbury_solve(Kf, lam, Rf.double())
            assert out.X.shape == (2, 5, 3) and out.info.dtype == torch.int32


def test_torch_compile_with_a_float_damping():
    K, R = _problem(2, 7, 2, torch.float32)

    def f(k, r):
        X, info, used = lk.woodbury_solve(k, 0.125, r)
        return X * 2.0, info, used

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(K, R), f(K, R)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- GPU: syncs -------------------------------------------------------------------------

def _native_cuda():
    if not caps.native_has_cuda():
        pytest.skip("the native extension was built without CUDA kernels")


@pytest.mark.cuda
@pytest.mark.parametrize("default_device", [None, "cuda"])
def test_cuda_float_damping_costs_no_sync(default_device):
    """A float damping is checked on the host and filled on the GPU by a kernel: no sync, no
    host-to-device copy, also under torch.set_default_device('cuda')."""
    _native_cuda()
    K, R = _problem(3, 9, 2, torch.float32, "cuda")
    expected = lk.woodbury_solve(K, 1e-3, R, backend="native")  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.device(default_device) if default_device else contextlib.nullcontext():
            got = lk.woodbury_solve(K, 1e-3, R, backend="native")
            unbatched = lk.woodbury_solve(K[0], 1e-3, R[0, :, 0], backend="native")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got.X, expected.X) and torch.equal(unbatched.X, expected.X[0, :, 0])


@pytest.mark.cuda
def test_cuda_damping_tensor_costs_no_sync():
    """A GPU damping tensor's values are checked in the kernel (info = -3): no sync."""
    _native_cuda()
    K, R = _problem(3, 9, 2, torch.float32, "cuda")
    lam = torch.tensor([0.1, -0.2, 0.3], device="cuda")
    lk.woodbury_solve(K, lam, R, backend="native")  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        X, info, _ = lk.woodbury_solve(K, lam, R, backend="native")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert info.tolist() == [0, -3, 0] and (X[1] == 0).all()
