"""The op table: each public op is declared once in torch.ops.lowrank_kernels, with a fake
kernel (torch.compile traces it) and CPU/CUDA kernels that check the arguments, pick a
backend and run it.

Backends: 'reference' (pure PyTorch, float64-capable: the oracle), 'triton', 'native'
(C++/CUDA in lowrank_kernels._C). 'auto' takes the first backend in the op's per-device
order that can run; LOWRANK_BACKEND sets the default, the per-call `backend` argument wins.

Per-call cost: what does not depend on the arguments' values (is the backend built, does it
run on this device and dtype, which backends 'auto' tries) is worked out once per (op,
device type, dtype, requested backend, TRITON_INTERPRET) and kept in a plan; a call then
only runs the op's checks, the `supports` predicates of the planned backends, the backend,
and the results' non-finite check (a reduction each, one host sync). The plans read an op's
`backends` and `auto` when first needed: call `clear_backend_plans()` after changing them.
"""
import dataclasses
from typing import Callable

import torch

from . import _capabilities as caps
from ._checks import all_finite, getenv, raise_if_nonfinite

BACKENDS = ("reference", "triton", "native")
NAMESPACE = "lowrank_kernels"
_LIB = torch.library.Library(NAMESPACE, "DEF")


class BackendUnavailableError(RuntimeError):
    """The requested backend is not built, or cannot run on these inputs."""


@dataclasses.dataclass(frozen=True)
class Backend:
    run: Callable
    dtypes: dict  # device type ("cpu"/"cuda") -> tuple of supported input dtypes
    # supports(*args) -> None, or why this backend cannot take these arguments (a shape,
    # an option it lacks); 'auto' then moves on to the next backend.
    supports: Callable | None = None


@dataclasses.dataclass(frozen=True)
class OpSpec:
    name: str
    schema: str  # "(Tensor A, ..., str? backend=None) -> Tensor": backend comes last
    check: Callable  # check(*args) raises on bad input; returns the tensor that sets device/dtype
    fake: Callable
    backends: dict  # backend name -> Backend
    auto: dict  # device type -> backend names in order of preference
    finite_inputs: tuple = ()  # argument names whose NaN/Inf is reported when the result has any
    doc: str = ""


REGISTRY: dict[str, OpSpec] = {}


def _backend_name(raw):
    """raw: the per-call backend, else $LOWRANK_BACKEND (None when unset)."""
    name = "auto" if raw is None else raw
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; "
                         f"got {name!r}")
    return name


def requested_backend(backend):
    return _backend_name(backend if backend is not None else getenv("LOWRANK_BACKEND"))


def _static_reason(spec: OpSpec, backend: str, device_type: str, dtype) -> str | None:
    """Why `backend` cannot run `spec` on (device_type, dtype) whatever the arguments."""
    if backend not in spec.backends:
        return f"{spec.name} has no {backend} backend"
    dtypes = spec.backends[backend].dtypes.get(device_type)
    if dtypes is None:
        return f"the {backend} backend of {spec.name} does not run on {device_type} tensors"
    if backend == "native":
        if not caps.native_built():
            return f"the native extension is not built ({caps.native_import_error()})"
        if device_type == "cuda" and not caps.native_has_cuda():
            return "the native extension was built without CUDA kernels (LOWRANK_BUILD_CUDA)"
    if backend == "triton":
        if not caps.has_triton():
            return "triton is not installed"
        if device_type == "cpu" and not caps.triton_interpreter():
            return ("Triton kernels run on CPU tensors only under its interpreter: set "
                    "TRITON_INTERPRET=1 before importing lowrank_kernels")
    if dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        return (f"the {backend} backend of {spec.name} on {device_type} takes {names}, "
                f"got {dtype}")
    return None


def unavailable_reason(spec: OpSpec, backend: str, device_type: str, dtype,
                       args=None) -> str | None:
    """Why `backend` cannot run `spec` on (device_type, dtype) [with these args]; None when
    it can."""
    reason = _static_reason(spec, backend, device_type, dtype)
    if reason is not None:
        return reason
    supports = spec.backends[backend].supports
    if args is not None and supports is not None:
        return supports(*args)
    return None


# A plan: (explicit, candidates, fixed). explicit: the requested backend's name, or None for
# 'auto'; candidates: ((name, static reason or None, supports or None, run or None), ...), the
# requested backend alone or spec.auto[device_type] in order; fixed: (name, run) of the first
# candidate when it can run whatever the arguments (no static reason, no supports), else None.
_PLANS: dict[str, tuple] = {}  # op name -> (spec, {key: plan}), filled by register


def clear_backend_plans():
    """Forget the cached plans (after changing an OpSpec's backends or auto order)."""
    for _, plans in _PLANS.values():
        plans.clear()


def _make_plan(spec: OpSpec, device_type: str, dtype, raw):
    name = _backend_name(raw)  # a bad name raises here, on every call: it is never cached

    def entry(candidate):
        reason = _static_reason(spec, candidate, device_type, dtype)
        if reason is not None:
            return candidate, reason, None, None
        chosen = spec.backends[candidate]
        return candidate, None, chosen.supports, chosen.run

    candidates = ((entry(name),) if name != "auto"
                  else tuple(entry(c) for c in spec.auto.get(device_type, ())))
    first = candidates[0] if candidates else (None, "", None, None)
    fixed = (first[0], first[3]) if first[1] is None and first[2] is None else None
    return (name if name != "auto" else None), candidates, fixed


def _plan_key(device_type: str, dtype, backend):
    raw = backend if backend is not None else getenv("LOWRANK_BACKEND")
    return (device_type, dtype, raw, getenv("TRITON_INTERPRET")), raw


def _plan(spec: OpSpec, device_type: str, dtype, backend):
    key, raw = _plan_key(device_type, dtype, backend)
    cached = _PLANS.get(spec.name)
    if cached is None or cached[0] is not spec:  # not registered: nothing to cache
        return _make_plan(spec, device_type, dtype, raw)
    plan = cached[1].get(key)
    if plan is None:
        plan = cached[1][key] = _make_plan(spec, device_type, dtype, raw)
    return plan


def _select(spec: OpSpec, plan, device_type: str, dtype, args):
    """(name, run) of the backend that runs these args (args None: skip `supports`)."""
    explicit, candidates, fixed = plan
    if fixed is not None:
        return fixed
    reasons = []
    for name, reason, supports, run in candidates:
        if reason is None and supports is not None and args is not None:
            reason = supports(*args)
        if reason is None:
            return name, run
        if explicit is not None:
            raise BackendUnavailableError(f"{spec.name}: backend {name!r} cannot run: {reason}")
        reasons.append(reason)
    raise BackendUnavailableError(
        f"{spec.name}: no backend runs on {device_type} with {dtype}: " + "; ".join(reasons))


def choose_backend(spec: OpSpec, device_type: str, dtype, backend=None, args=None) -> str:
    """The backend that runs spec: `backend` if it can (else an error saying why not), or
    for 'auto' the first of spec.auto[device_type] that can. args: the op's arguments
    (without backend), for the backends' `supports` predicates."""
    plan = _plan(spec, device_type, dtype, backend)
    return _select(spec, plan, device_type, dtype, args)[0]


def _device_type(t: torch.Tensor) -> str:
    return "cpu" if t.is_cpu else ("cuda" if t.is_cuda else t.device.type)


def register(spec: OpSpec) -> OpSpec:
    """Declare spec's schema in torch.ops.lowrank_kernels with its fake and device kernels."""
    qualname = f"{NAMESPACE}::{spec.name}"
    arguments = torch._C.parse_schema(qualname + spec.schema).arguments
    names = [a.name for a in arguments]
    assert names[-1] == "backend", f"{spec.name}: the schema's last argument must be backend"
    _LIB.define(spec.name + spec.schema)
    count = len(arguments)
    defaults = tuple(a.default_value for a in arguments)  # None where there is none
    list_defaults = any(isinstance(d, list) for d in defaults)
    missing = [n for n in spec.finite_inputs if n not in names]
    assert not missing, f"{spec.name}: finite_inputs {missing} are not arguments of the schema"
    finite_at = tuple(names.index(n) for n in spec.finite_inputs)

    def complete(args, kwargs):
        # The dispatcher drops trailing arguments left at their defaults: put them back.
        if len(args) == count and not kwargs:
            return args
        if not kwargs and not list_defaults:
            return args + defaults[len(args):]
        tail = [kwargs[a.name] if a.name in kwargs else defaults[i]
                for i, a in enumerate(arguments[len(args):], len(args))]
        if list_defaults:  # a fresh list per call, as the schema would give
            tail = [list(d) if isinstance(d, list) else d for d in tail]
        return tuple(args) + tuple(tail)

    plans = {}
    _PLANS[spec.name] = (spec, plans)

    def kernel(*args, **kwargs):
        if len(args) != count or kwargs:
            args = complete(args, kwargs)
        inputs = args[:-1]
        lead = spec.check(*inputs)
        device_type = "cpu" if lead.is_cpu else _device_type(lead)
        dtype = lead.dtype
        key, raw = _plan_key(device_type, dtype, args[-1])
        plan = plans.get(key)
        if plan is None:
            plan = plans[key] = _make_plan(spec, device_type, dtype, raw)
        run = (plan[2] or _select(spec, plan, device_type, dtype, inputs))[1]
        result = run(*inputs)
        if finite_at and getenv("LOWRANK_CHECK_FINITE") != "0":
            outs = result if isinstance(result, tuple) else (result,)
            if not all_finite(*outs):  # one host sync for all the outputs
                named = [(names[i], args[i]) for i in finite_at]
                for out in outs:  # the first non-finite output raises
                    raise_if_nonfinite(spec.name, out, named)
        return result

    def fake(*args, **kwargs):
        args = complete(args, kwargs)
        spec.check(*args[:-1])
        return spec.fake(*args[:-1])

    for device_type in ("cpu", "cuda"):
        torch.library.impl(qualname, device_type, lib=_LIB)(kernel)
    torch.library.register_fake(qualname, lib=_LIB)(fake)
    REGISTRY[spec.name] = spec
    return spec


def backend_table():
    """{op: {device: backend auto picks, or the reason none can}} for the bug report."""
    table = {}
    for name, spec in REGISTRY.items():
        row = {}
        for device_type in ("cpu", "cuda"):
            if device_type == "cuda" and not caps.cuda_available():
                dtype = torch.float32
                picks = [b for b in spec.auto.get("cuda", ())
                         if unavailable_reason(spec, b, "cuda", dtype) is None]
                row[device_type] = (picks[0] + " (no GPU here)") if picks else "none"
                continue
            try:
                row[device_type] = choose_backend(spec, device_type, torch.float32, "auto")
            except BackendUnavailableError as exc:
                row[device_type] = f"none ({exc})"
        table[name] = row
    return table
