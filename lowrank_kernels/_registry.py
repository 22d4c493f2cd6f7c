"""The op table: each public op is declared once in torch.ops.lowrank_kernels, with a fake
kernel (torch.compile traces it) and CPU/CUDA kernels that check the arguments, pick a
backend and run it.

Backends: 'reference' (pure PyTorch, float64-capable: the oracle), 'triton', 'native'
(C++/CUDA in lowrank_kernels._C). 'auto' takes the first backend in the op's per-device
order that can run; LOWRANK_BACKEND sets the default, the per-call `backend` argument wins.
"""
import dataclasses
import os
from typing import Callable

import torch

from . import _capabilities as caps
from ._checks import raise_if_nonfinite

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


def requested_backend(backend):
    name = backend if backend is not None else os.environ.get("LOWRANK_BACKEND", "auto")
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; "
                         f"got {name!r}")
    return name


def unavailable_reason(spec: OpSpec, backend: str, device_type: str, dtype,
                       args=None) -> str | None:
    """Why `backend` cannot run `spec` on (device_type, dtype) [with these args]; None when
    it can."""
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
    supports = spec.backends[backend].supports
    if args is not None and supports is not None:
        return supports(*args)
    return None


def choose_backend(spec: OpSpec, device_type: str, dtype, backend=None, args=None) -> str:
    """The backend that runs spec: `backend` if it can (else an error saying why not), or
    for 'auto' the first of spec.auto[device_type] that can. args: the op's arguments
    (without backend), for the backends' `supports` predicates."""
    name = requested_backend(backend)
    if name != "auto":
        reason = unavailable_reason(spec, name, device_type, dtype, args)
        if reason is not None:
            raise BackendUnavailableError(f"{spec.name}: backend {name!r} cannot run: {reason}")
        return name
    reasons = []
    for candidate in spec.auto.get(device_type, ()):
        reason = unavailable_reason(spec, candidate, device_type, dtype, args)
        if reason is None:
            return candidate
        reasons.append(reason)
    raise BackendUnavailableError(
        f"{spec.name}: no backend runs on {device_type} with {dtype}: " + "; ".join(reasons))


def register(spec: OpSpec) -> OpSpec:
    """Declare spec's schema in torch.ops.lowrank_kernels with its fake and device kernels."""
    qualname = f"{NAMESPACE}::{spec.name}"
    arguments = torch._C.parse_schema(qualname + spec.schema).arguments
    names = [a.name for a in arguments]
    assert names[-1] == "backend", f"{spec.name}: the schema's last argument must be backend"
    _LIB.define(spec.name + spec.schema)

    def complete(args, kwargs):
        # The dispatcher drops trailing arguments left at their defaults: put them back.
        args = list(args)
        for a in arguments[len(args):]:
            args.append(kwargs[a.name] if a.name in kwargs else a.default_value)
        return args

    def kernel(*args, **kwargs):
        args = complete(args, kwargs)
        lead = spec.check(*args[:-1])
        chosen = choose_backend(spec, lead.device.type, lead.dtype, args[-1], args[:-1])
        result = spec.backends[chosen].run(*args[:-1])
        if spec.finite_inputs:
            named = dict(zip(names, args))
            inputs = [(n, named[n]) for n in spec.finite_inputs]
            for out in result if isinstance(result, tuple) else (result,):
                raise_if_nonfinite(spec.name, out, inputs)
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
