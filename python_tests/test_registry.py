"""The op router (lowrank_kernels._registry) and the shared checks (lowrank_kernels._checks):
the cached backend plans choose exactly what the uncached rules choose, with the same errors,
and follow LOWRANK_BACKEND / TRITON_INTERPRET / LOWRANK_CHECK_FINITE changes at run time; the
argument completion puts back the schema's defaults; the one-reduction non-finite check flags
NaN and ±Inf exactly and never an overflowing sum of finite values."""
import os

import pytest
import torch

import lowrank_kernels as lk
from lowrank_kernels import _capabilities as caps
from lowrank_kernels import _checks
from lowrank_kernels import _registry as reg
from lowrank_kernels._registry import Backend, BackendUnavailableError, OpSpec


def _uncached_choice(spec, device_type, dtype, backend=None, args=None):
    """The routing rules written out plainly (no plans): what choose_backend must return or
    raise."""
    name = backend if backend is not None else os.environ.get("LOWRANK_BACKEND", "auto")
    if name != "auto" and name not in reg.BACKENDS:
        raise ValueError(f"backend must be one of 'auto', "
                         f"{', '.join(map(repr, reg.BACKENDS))}; got {name!r}")
    if name != "auto":
        reason = reg.unavailable_reason(spec, name, device_type, dtype, args)
        if reason is not None:
            raise BackendUnavailableError(f"{spec.name}: backend {name!r} cannot run: {reason}")
        return name
    reasons = []
    for candidate in spec.auto.get(device_type, ()):
        reason = reg.unavailable_reason(spec, candidate, device_type, dtype, args)
        if reason is None:
            return candidate
        reasons.append(reason)
    raise BackendUnavailableError(
        f"{spec.name}: no backend runs on {device_type} with {dtype}: " + "; ".join(reasons))


def _outcome(fn, *args):
    try:
        return "ok", fn(*args)
    except (ValueError, BackendUnavailableError) as exc:
        return type(exc).__name__, str(exc)


DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64)


@pytest.mark.parametrize("env_backend", [None, "reference", "native", "auto", "cublas"])
@pytest.mark.parametrize("interpret", ["1", "0"])
def test_plans_match_the_uncached_rules_for_every_op(monkeypatch, env_backend, interpret):
    if env_backend is None:
        monkeypatch.delenv("LOWRANK_BACKEND", raising=False)
    else:
        monkeypatch.setenv("LOWRANK_BACKEND", env_backend)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    for spec in list(lk.REGISTRY.values()):
        for device_type in ("cpu", "cuda"):
            for dtype in DTYPES:
                for backend in (None, "auto", *reg.BACKENDS, "cublas"):
                    want = _outcome(_uncached_choice, spec, device_type, dtype, backend)
                    for _ in range(2):  # the first call fills the plan, the second reads it
                        got = _outcome(reg.choose_backend, spec, device_type, dtype, backend)
                        assert got == want, (spec.name, device_type, dtype, backend)


def test_an_unregistered_spec_is_routed_without_caching():
    spec = OpSpec(name="not_registered", schema="", check=None, fake=None,
                  backends={"reference": Backend(None, {"cpu": (torch.float32,)})},
                  auto={"cpu": ("native", "reference")})
    assert reg.choose_backend(spec, "cpu", torch.float32) == "reference"
    with pytest.raises(BackendUnavailableError, match=r"no backend runs on cpu with "
                                                      r"torch.float64: .*no native backend"):
        reg.choose_backend(spec, "cpu", torch.float64)
    assert "not_registered" not in reg._PLANS


# ---- a registered test op: completion, supports, finite check, plan updates ------------------

CALLS = []


def _run_reference(x, size, scale, flag):
    CALLS.append(("reference", size, scale, flag))
    return x * scale


def _run_native(x, size, scale, flag):
    CALLS.append(("native", size, scale, flag))
    size.append(-1)  # a backend that scribbles on its list argument must not change the default
    return x * scale


def _native_supports(x, size, scale, flag):
    return None if x.shape[0] % 2 else "the test kernel takes odd lengths only"


def _check(x, size, scale, flag):
    _checks.check_tensor("router_test", "x", x, 1, "n")
    _checks.check_float("router_test", "x", x)
    return x


ROUTER_SPEC = OpSpec(
    name="_router_test",
    schema="(Tensor x, int[2] size=1, float scale=1.0, *, bool flag=False, "
           "str? backend=None) -> Tensor",
    check=_check,
    fake=lambda x, size, scale, flag: torch.empty_like(x),
    backends={"reference": Backend(_run_reference, {"cpu": (torch.float32, torch.float64)}),
              "native": Backend(_run_native, {"cpu": (torch.float32,)}, _native_supports)},
    auto={"cpu": ("native", "reference")},
    finite_inputs=("x",),
)


@pytest.fixture(scope="module")
def router_op():
    if ROUTER_SPEC.name not in lk.REGISTRY:
        reg.register(ROUTER_SPEC)
    yield torch.ops.lowrank_kernels._router_test
    lk.REGISTRY.pop(ROUTER_SPEC.name, None)  # other tests walk the registry
    reg._PLANS.pop(ROUTER_SPEC.name, None)


@pytest.fixture()
def native_built():
    if not caps.native_built():
        pytest.skip("the routing test names the native backend: extension not built")


def test_defaults_are_put_back_fresh_per_call(router_op, native_built, monkeypatch):
    monkeypatch.delenv("LOWRANK_BACKEND", raising=False)
    x = torch.arange(3.0)
    CALLS.clear()
    torch.testing.assert_close(router_op(x), x)
    torch.testing.assert_close(router_op(x), x)
    torch.testing.assert_close(router_op(x, [2, 3], 2.0, flag=True), 2 * x)
    assert CALLS == [("native", [1, 1, -1], 1.0, False), ("native", [1, 1, -1], 1.0, False),
                     ("native", [2, 3, -1], 2.0, True)]


def test_supports_is_asked_on_every_call(router_op, native_built, monkeypatch):
    monkeypatch.delenv("LOWRANK_BACKEND", raising=False)
    CALLS.clear()
    router_op(torch.ones(3))
    router_op(torch.ones(4))  # auto: native declines even lengths, the reference runs
    router_op(torch.ones(5))
    router_op(torch.ones(3, dtype=torch.float64))  # native does not take float64
    assert [c[0] for c in CALLS] == ["native", "reference", "native", "reference"]
    with pytest.raises(BackendUnavailableError,
                       match=r"_router_test: backend 'native' cannot run: the test kernel takes "
                             r"odd lengths only"):
        router_op(torch.ones(4), backend="native")
    with pytest.raises(BackendUnavailableError, match=r"native backend of _router_test on cpu "
                                                      r"takes float32, got torch.float64"):
        router_op(torch.ones(3, dtype=torch.float64), backend="native")
    with pytest.raises(BackendUnavailableError,
                       match=r"_router_test: no backend runs on cpu with torch.float16: the "
                             r"native backend .* got torch.float16; the reference backend .* "
                             r"got torch.float16"):
        router_op(torch.ones(3, dtype=torch.float16))


def test_environment_changes_take_effect_at_once(router_op, native_built, monkeypatch):
    x = torch.ones(3)
    CALLS.clear()
    monkeypatch.delenv("LOWRANK_BACKEND", raising=False)
    router_op(x)
    monkeypatch.setenv("LOWRANK_BACKEND", "reference")
    router_op(x)
    router_op(x, backend="native")  # the argument wins over the environment
    monkeypatch.setenv("LOWRANK_BACKEND", "triton")
    with pytest.raises(BackendUnavailableError, match=r"_router_test has no triton backend"):
        router_op(x)
    monkeypatch.setenv("LOWRANK_BACKEND", "cublas")
    for _ in range(2):  # a bad name is never cached: it raises every time
        with pytest.raises(ValueError, match=r"backend must be one of .* got 'cublas'"):
            router_op(x)
    monkeypatch.delenv("LOWRANK_BACKEND")
    router_op(x)
    assert [c[0] for c in CALLS] == ["native", "reference", "native", "native"]


def test_changed_backends_after_clear_backend_plans(router_op, native_built, monkeypatch):
    monkeypatch.delenv("LOWRANK_BACKEND", raising=False)
    x = torch.ones(3)
    CALLS.clear()
    router_op(x)
    monkeypatch.setitem(ROUTER_SPEC.auto, "cpu", ("reference",))
    reg.clear_backend_plans()
    router_op(x)
    monkeypatch.undo()
    reg.clear_backend_plans()
    router_op(x)
    assert [c[0] for c in CALLS] == ["native", "reference", "native"]


def test_finite_check_names_the_input_or_the_overflow(router_op, monkeypatch):
    monkeypatch.delenv("LOWRANK_CHECK_FINITE", raising=False)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.ones(3, dtype=torch.float64)
        x[1] = bad
        with pytest.raises(ValueError, match=r"_router_test: x contains non-finite values"):
            router_op(x, backend="reference")
    big = torch.full((3,), 3e38)
    with pytest.raises(FloatingPointError, match=r"the result is not finite although every "
                                                 r"input is"):
        router_op(big, scale=10.0, backend="reference")
    # finite, but its sum overflows float32: no false alarm
    torch.testing.assert_close(router_op(big, backend="reference"), big)
    monkeypatch.setenv("LOWRANK_CHECK_FINITE", "0")
    assert torch.isinf(router_op(big, scale=10.0, backend="reference")).all()


# ---- the shared checks --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_all_finite_is_exact(dtype):
    top = torch.finfo(dtype).max
    assert _checks.all_finite(torch.zeros(0, dtype=dtype))
    assert _checks.all_finite(torch.randn(7, 5).to(dtype))
    # a sum of finite values that overflows is not a non-finite value
    assert _checks.all_finite(torch.full((4, 3), top, dtype=dtype))
    assert _checks.all_finite(torch.tensor([top, top, -top], dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for i in (0, 6, 34):
            t = torch.randn(5, 7).to(dtype)
            t.view(-1)[i] = bad
            assert not _checks.all_finite(t), (bad, i)
            assert not _checks.all_finite(t.mT), (bad, i)  # non-contiguous
    assert not _checks.all_finite(torch.tensor([float("inf"), -float("inf")], dtype=dtype))
    assert not _checks.all_finite(torch.tensor([top, float("nan")], dtype=dtype))


def test_all_finite_of_several_tensors():
    top16 = torch.full((3,), torch.finfo(torch.float16).max, dtype=torch.float16)
    ok = (torch.randn(4, 3), top16, torch.arange(5), torch.randn(2, dtype=torch.float64))
    assert _checks.all_finite(*ok)
    assert _checks.all_finite()
    for i in (0, 1, 3):
        for bad in (float("nan"), float("inf"), -float("inf")):
            tensors = [t.clone() for t in ok]
            tensors[i].view(-1)[-1] = bad
            assert not _checks.all_finite(*tensors), (i, bad)
    inf = torch.tensor([float("inf")])
    assert not _checks.all_finite(inf, -inf)  # the sums' sum is NaN, not a cancellation


def test_all_finite_other_dtypes():
    assert _checks.all_finite(torch.tensor([2 ** 62, 2 ** 62], dtype=torch.int64))
    assert _checks.all_finite(torch.tensor([True, False]))
    assert _checks.all_finite(torch.tensor([1 + 2j]))
    assert not _checks.all_finite(torch.tensor([complex(1, float("inf"))]))


def test_getenv_follows_os_environ(monkeypatch):
    name = "LOWRANK_TEST_GETENV"
    monkeypatch.delenv(name, raising=False)
    assert _checks.getenv(name) is None and _checks.getenv(name, "d") == "d"
    for value in ("", "0", "reference", "é"):
        monkeypatch.setenv(name, value)
        assert _checks.getenv(name) == os.environ[name] == value
    monkeypatch.delenv(name)
    assert _checks.getenv(name, "1") == "1"


def test_check_messages():
    A, E = torch.ones(2, 3), torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^op: A and E must have the same dtype, got A: "
                                         r"torch.float32, E: torch.float64$"):
        _checks.check_same("op", ("A", "E"), (A, E), "dtype")
    with pytest.raises(ValueError, match=r"^op: A and E and F must have the same dtype, got "
                                         r"A: torch.float32, E: torch.float32, F: "
                                         r"torch.float64$"):
        _checks.check_same("op", ("A", "E", "F"), (A, A, E), "dtype")
    _checks.check_same("op", ("A", "E", "F"), iter((A, A, A)), "device")
    with pytest.raises(ValueError, match=r"^op: A must be a 2 or 3-D tensor \(doc\), got "
                                         r"shape \(2, 3, 1, 1\)$"):
        _checks.check_tensor("op", "A", A[..., None, None], (2, 3), "doc")
    with pytest.raises(ValueError, match=r"^op: A must be a 1-D tensor \(doc\), got shape "):
        _checks.check_tensor("op", "A", A, 1, "doc")
    with pytest.raises(TypeError, match=r"^op: A must be a torch.Tensor, got list$"):
        _checks.check_tensor("op", "A", [1.0])
    with pytest.raises(TypeError, match=r"^op: A must have a floating dtype \(float32, "
                                        r"float64\), got torch.int64$"):
        _checks.check_float("op", "A", A.long(), (torch.float32, torch.float64))
