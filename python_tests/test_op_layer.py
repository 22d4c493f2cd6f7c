"""The op layer: every op through PyTorch's dispatcher (opcheck on every backend that runs
here), no host sync on the default path, forced backends and strict mode."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lowrank_kernels as lk
import lowrank_kernels.optim  # noqa: F401
from conftest import backends_for
from lowrank_kernels import _registry

pytestmark = pytest.mark.usefixtures("one_thread")


def _spd(b, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(b, n, n, generator=g)
    return X @ X.mT / n + torch.eye(n)


def _cases():
    """{op: [(args, kwargs)]}: small valid inputs, every option the schema has."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    A, E, c = r(5, 3), r(5, 4), r(5)
    At, Et = r(4, 3, 5), r(4, 3, 2)
    X, Ec = r(2, 4, 5, 5), r(2, 6, 5, 5)  # conv 3x3, padding 1, groups 2
    idx = torch.randint(0, 5, (3, 4), generator=g)
    Ee = r(3, 4, 6)
    conv = [1, 1, 1, 1, 1, 1, 2]  # geometry: stride, padding, dilation (pairs), groups
    return {
        "gram_linear": [((A, E, True), {}), ((At, Et, False), {"route": "per_sample"}),
                        ((At, Et, True, At[:2], Et[:2]), {}), ((A, E, True), {"diagonal": True})],
        "gram_conv2d": [((X, Ec, [3, 3] + conv, True), {}),
                        ((X, Ec, [3, 3] + conv, False), {"diagonal": True})],
        "gram_embedding": [((idx, Ee, 5, 1), {}), ((idx, Ee, 5, None, idx[:2], Ee[:2]), {}),
                           ((idx, Ee, 5, None), {"diagonal": True})],
        "weighted_sum_linear": [((A, E, c, True), {}), ((At, Et, torch.stack([c[:4], -c[:4]], 1)), {})],
        "weighted_sum_conv2d": [((X, Ec, c[:2], [3, 3] + conv, True), {})],
        "weighted_sum_embedding": [((idx, Ee, c[:3], 5, 0), {}), ((idx, Ee, r(3, 2), 5), {})],
        "project_linear": [((A, E, r(4, 3), r(4)), {}), ((At, Et, r(2, 2, 5)), {})],
        "project_conv2d": [((X, Ec, r(6, 2, 3, 3), r(6), conv), {}),
                           ((X, Ec, r(2, 6, 2, 3, 3), None, conv), {})],
        "project_embedding": [((idx, Ee, r(5, 6), -1), {}), ((idx, Ee, r(2, 5, 6)), {})],
        "woodbury_solve": [((_spd(2, 6), torch.tensor([0.1, 0.2]), r(2, 6, 3), None, 4), {}),
                           ((_spd(1, 6)[0], torch.tensor(0.5), r(6), 1e-5, 2), {})],
        "sketch_omega": [((torch.arange(6) * 3, 5, 3, "gaussian", 4), {}),
                         ((torch.arange(4), 3, 1, "rademacher"), {})],
        "sketch_matmul": [((r(6, 5), 4, 1, "gaussian", True, 3), {}),
                          ((r(6, 5), 4, 1, "rademacher", False, 0), {})],
        "fwht": [((r(4, 32),), {})],
        "random_subspace_expand": [((r(6), 1, 33, 0.2, "gaussian", r(33)), {})],
        "random_subspace_project": [((r(33), 1, 6, 0.2, "rademacher"), {})],
        "subspace_project": [((r(37, 5), r(37)), {})],
        "subspace_expand": [((r(37, 5), r(5), r(37)), {}), ((r(37, 5), r(5)), {})],
    }


CASES = _cases()


def test_every_op_has_cases():
    assert set(CASES) == set(lk.REGISTRY)


@pytest.mark.parametrize("op", sorted(CASES))
def test_opcheck_every_backend(op):
    """torch.library.opcheck (schema, fake, autograd registration, AOT dispatch) on the
    default kernels and on every backend that runs on CPU here."""
    overload = getattr(torch.ops.lowrank_kernels, op).default
    for args, kwargs in CASES[op]:
        torch.library.opcheck(overload, args, kwargs)
        for backend in backends_for(op, "cpu"):
            with lk.use_backend(backend):
                torch.library.opcheck(overload, args, kwargs)


@pytest.mark.parametrize("op", sorted(CASES))
def test_backends_agree_with_the_default_kernel(op):
    overload = getattr(torch.ops.lowrank_kernels, op).default
    for args, kwargs in CASES[op]:
        expected = overload(*args, **kwargs)
        for backend in backends_for(op, "cpu"):
            with lk.use_backend(backend):
                got = overload(*args, **kwargs)
            torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5,
                                       msg=lambda m: f"{op} on {backend}: {m}")


SYNCS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "nonzero",
         "masked_select", "unique_consecutive", "_unique2", "unique_dim"}


def _kernel(op, device_type):
    """The backend of op's kernel on device_type in a full build (GPU: its first auto)."""
    if device_type == "cpu":
        return _registry._KERNELS[op, "cpu"]
    return (lk.REGISTRY[op].auto.get("cuda") or ("reference",))[0]


class SyncCounter(TorchDispatchMode):
    """Counts the aten calls that block a GPU stream (a value read on the host), including
    those inside the lowrank_kernels ops' own Python kernels (run here as the dispatcher
    would run them on CPU; a C++ kernel's own reads are invisible to a dispatch mode)."""

    def __init__(self, device_type="cpu"):
        super().__init__()
        self.syncs = []
        self.device_type = device_type  # whose kernel each op runs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in SYNCS or func.__name__.split(".")[0] in SYNCS:
            self.syncs.append(str(func))
        entry = _registry._BY_OVERLOAD.get(func)
        if entry is not None:
            spec, arguments = entry
            backend = _kernel(spec.name, self.device_type)
            if backend != "native":
                args = _registry._complete(arguments, args, kwargs)
                with self:  # look inside the op's kernel too
                    spec.check(*args)
                    return spec.backends[backend].run(*args)
        return func(*args, **kwargs)


@pytest.mark.parametrize("op", sorted(CASES))
def test_default_path_does_not_synchronize(op):
    """The kernels the dispatcher runs on CPU, and those it runs on CUDA (Triton, run here on
    CPU tensors under the interpreter), read nothing back to the host."""
    overload = getattr(torch.ops.lowrank_kernels, op).default
    for device_type in ("cpu", "cuda"):
        if _registry.static_reason(lk.REGISTRY[op], _kernel(op, device_type), "cpu"):
            continue  # that kernel cannot run on CPU tensors here (native CUDA)
        for args, kwargs in CASES[op]:
            with SyncCounter(device_type) as counter:
                overload(*args, **kwargs)
            assert counter.syncs == [], f"{op} ({device_type} kernel): host syncs {counter.syncs}"


def _optimizer_step(make):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(3 * 4 * 4, 5))
    opt = make(model)
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 5, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()  # a first step, outside
    opt.step()
    opt.zero_grad()
    with SyncCounter() as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    opt.close()
    return counter.syncs


@pytest.mark.parametrize("name", ["FNGD", "SENG", "KFAC"])
def test_an_optimizer_step_synchronizes_at_most_once(name):
    make = {
        "FNGD": lambda m: lk.optim.FNGD(m, lr=0.1, damping=0.1, steps_per_epoch=1),
        "SENG": lambda m: lk.optim.SENG(m, lr=0.1, damping=0.1, update_freq=2),
        "KFAC": lambda m: lk.optim.KFAC(m, lr=0.1, damping=0.1),
    }[name]
    syncs = _optimizer_step(make)
    assert len(syncs) <= 1, f"{name}: host syncs per step {syncs}"


def test_forcing_a_backend_that_cannot_run_says_why():
    A, E = torch.randn(4, 3), torch.randn(4, 2)
    with pytest.raises(lk.BackendUnavailableError, match="gram_linear has no cpu backend"):
        lk.gram_linear(A, E, backend="cpu")
    with pytest.raises(lk.BackendUnavailableError, match="takes float32, float16"):
        lk.gram_linear(A.double(), E.double(), backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        lk.gram_linear(A, E, backend="cuda")


def test_default_path_reports_nonfinite_results_and_strict_mode_raises():
    A, E = torch.randn(4, 3), torch.randn(4, 2)
    A[1, 2] = float("nan")
    K = lk.gram_linear(A, E)  # no check, no sync: the NaN is in the result
    assert torch.isnan(K[1]).all() and torch.isfinite(K[0, 0])
    with lk.strict(), pytest.raises(lk.NonFiniteError, match="A contains non-finite") as info:
        lk.gram_linear(A, E)
    assert info.value.argument == "A" and isinstance(info.value, FloatingPointError)
    big = torch.full((4, 3), 1e30)
    with lk.strict(), pytest.raises(lk.NonFiniteError, match="overflow") as info:
        lk.gram_linear(big, big)
    assert info.value.argument is None


def test_environment_backend_is_one_mode_for_the_process(tmp_path):
    import subprocess
    import sys
    code = ("import torch, lowrank_kernels as lk\n"
            "A = torch.randn(3, 2)\n"
            "try:\n    lk.gram_linear(A, A, backend=None)\nexcept lk.BackendUnavailableError as e:\n"
            "    print('refused', e)\n")
    env = {"LOWRANK_BACKEND": "cpu", "PATH": "/usr/bin:/bin"}
    import os
    env = {**os.environ, **env}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert "refused" in out.stdout and "no cpu backend" in out.stdout, out.stderr[-2000:]


def test_backend_table_names_a_kernel_per_device():
    table = _registry.backend_table()
    assert set(table) == set(lk.REGISTRY)
    assert table["woodbury_solve"]["cpu"] == ("native" if lk.native_build_info() != "not built"
                                              else "reference")


def test_empty_token_dimension_gives_zero_grams():
    """B·T = 0 is a valid input (issue 12.6): zero Grams on every backend."""
    idx, E = torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, 0, 4)
    for backend in backends_for("gram_embedding", "cpu"):
        K = lk.gram_embedding(idx, E, 5, idx2=idx[:2], E2=E[:2], backend=backend)
        assert K.shape == (3, 2) and (K == 0).all(), backend
        assert (lk.gram_embedding(idx, E, 5, backend=backend) == 0).all(), backend


def test_a_nan_at_a_padding_token_is_ignored_on_every_backend():
    """padding_idx gets no gradient: whatever its tokens' output gradients hold (NaN
    included) changes nothing, on every backend alike (issue 12.6)."""
    idx = torch.tensor([[0, 1, 2], [1, 0, 2]])
    E = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    clean, dirty = E.clone(), E.clone()
    clean[idx == 1], dirty[idx == 1] = 0.0, float("nan")
    V, c = torch.randn(3, 4), torch.randn(2)
    for backend in backends_for("gram_embedding", "cpu"):
        for fn in (lambda e: lk.gram_embedding(idx, e, 3, 1, backend=backend),
                   lambda e: lk.weighted_sum_embedding(idx, e, c, 3, 1, backend=backend),
                   lambda e: lk.project_embedding(idx, e, V, 1, backend=backend)):
            torch.testing.assert_close(fn(dirty), fn(clean), rtol=0, atol=0)
