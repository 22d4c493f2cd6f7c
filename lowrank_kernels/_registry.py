"""The op table, routed by PyTorch's dispatcher.

Each public op is declared once in torch.ops.lowrank_kernels (`register(spec)`), with
- a fake kernel (shapes and dtypes only: torch.compile and FakeTensor trace it),
- a default kernel on every device (CompositeExplicitAutograd): the op's PyTorch reference,
- per-device overrides on the same schema: a Python kernel (a Triton launcher, a CPU
  formulation) registered here, or a C++/CUDA kernel registered from C++
  (`TORCH_LIBRARY_IMPL(lowrank_kernels, CPU|CUDA, m)` in csrc/), which never enters Python.
The dispatcher picks the kernel by device; nothing in Python decides per call. Which kernel
each device gets is fixed at import from the op's `auto` order: the first backend that is
built and can run there (`python -m lowrank_kernels` prints the table). A Python override
whose backend cannot take some arguments (a dtype, an option) hands them to the reference.

Forcing a backend, for tests and benchmarks: `with lowrank_kernels.use_backend("triton"):`
(or LOWRANK_BACKEND=triton set before the import) routes every op to that backend through a
TorchDispatchMode, with a BackendUnavailableError saying why it cannot run. Strict mode
(`with lowrank_kernels.strict():`, LOWRANK_STRICT=1) also checks every result for NaN/Inf
(one host sync per op) and raises NonFiniteError naming the non-finite input. Outside these
modes none of it is paid: the default path syncs nothing and reports non-finite results as
they are (the optimizers test their directions on the device).
"""
import contextlib
import dataclasses
import os
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import _capabilities as caps

BACKENDS = ("reference", "cpu", "triton", "native")
NAMESPACE = "lowrank_kernels"
_LIB = torch.library.Library(NAMESPACE, "DEF")
_FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class BackendUnavailableError(RuntimeError):
    """The requested backend is not built, or cannot run on these inputs."""


class NonFiniteError(FloatingPointError, ValueError):
    """Strict mode: an op's result has NaN/Inf. `argument` names the first non-finite input
    (None when every input is finite: the fp32 accumulator overflowed)."""

    def __init__(self, message, op, argument=None):
        super().__init__(message)
        self.op, self.argument = op, argument


@dataclasses.dataclass(frozen=True)
class Backend:
    run: Callable | None  # run(*args): the op's arguments in schema order; None for a native
    # kernel registered from C++ (then the op itself runs it)
    dtypes: dict  # device type ("cpu"/"cuda") -> tuple of supported input dtypes
    # supports(*args) -> None, or why this backend cannot take these arguments (a shape, an
    # option it lacks): the device kernel then runs the reference.
    supports: Callable | None = None


@dataclasses.dataclass(frozen=True)
class OpSpec:
    name: str
    schema: str  # "(Tensor A, ...) -> Tensor"
    check: Callable  # check(*args) raises on bad input; returns the tensor that sets device/dtype
    fake: Callable
    backends: dict  # backend name -> Backend; "reference" runs everywhere
    auto: dict  # device type -> backend names in order of preference
    finite_inputs: tuple = ()  # argument names strict mode blames for a non-finite result


REGISTRY: dict[str, OpSpec] = {}
_BY_OVERLOAD: dict = {}  # OpOverload -> (spec, argument names, defaults)
_KERNELS: dict = {}  # (op, device type) -> the backend the dispatcher runs there


def static_reason(spec: OpSpec, backend: str, device_type: str, dtype=None) -> str | None:
    """Why `backend` cannot run `spec` on device_type [and dtype], whatever the arguments."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; "
                         f"got {backend!r}")
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
    if dtype is not None and dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        return (f"the {backend} backend of {spec.name} on {device_type} takes {names}, "
                f"got {dtype}")
    return None


def unavailable_reason(spec: OpSpec, backend: str, device_type: str, dtype,
                       args=None) -> str | None:
    """Why `backend` cannot run `spec` on (device_type, dtype) [with these args]; None when
    it can."""
    reason = static_reason(spec, backend, device_type, dtype)
    supports = spec.backends[backend].supports if reason is None else None
    if args is not None and supports is not None:
        return supports(*args)
    return reason


def kernel_backend(spec: OpSpec, device_type: str) -> str:
    """The backend the dispatcher runs for `spec` on device_type (fixed at import)."""
    for name in spec.auto.get(device_type, ()):
        if static_reason(spec, name, device_type) is None:
            return name
    return "reference"


def choose_backend(spec: OpSpec, device_type: str, dtype, backend=None, args=None) -> str:
    """The backend that runs spec on (device_type, dtype[, args]): `backend` if it can (else
    BackendUnavailableError saying why not); for None/'auto' the device's kernel, or the
    reference where that cannot take these inputs."""
    if backend is None or backend == "auto":
        name = kernel_backend(spec, device_type)
        return name if unavailable_reason(spec, name, device_type, dtype, args) is None \
            else "reference"
    reason = unavailable_reason(spec, backend, device_type, dtype, args)
    if reason is not None:
        raise BackendUnavailableError(f"{spec.name}: backend {backend!r} cannot run: {reason}")
    return backend


def _device_type(t: torch.Tensor) -> str:
    return "cpu" if t.is_cpu else ("cuda" if t.is_cuda else t.device.type)


def register(spec: OpSpec) -> OpSpec:
    """Declare spec in torch.ops.lowrank_kernels: schema, fake kernel, the reference as the
    default kernel, and the Python override of each device whose auto backend is not native
    (native kernels are registered from C++ on the same schema)."""
    qualname = f"{NAMESPACE}::{spec.name}"
    _LIB.define(spec.name + spec.schema)
    overload = getattr(torch.ops.lowrank_kernels, spec.name).default
    arguments = overload._schema.arguments
    names = tuple(a.name for a in arguments)
    for name, backend in list(spec.backends.items()):
        if backend.run is None:  # registered from C++ on this schema
            spec.backends[name] = dataclasses.replace(backend, run=overload)
    missing = [n for n in spec.finite_inputs if n not in names]
    assert not missing, f"{spec.name}: finite_inputs {missing} are not arguments of the schema"
    reference = spec.backends["reference"].run
    check = spec.check
    count = len(arguments)
    complete = _completer(arguments)

    def fake(*args, **kwargs):
        if len(args) != count or kwargs:
            args = complete(args, kwargs)
        check(*args)
        return spec.fake(*args)

    def default(*args, **kwargs):
        if len(args) != count or kwargs:  # the dispatcher drops trailing defaults
            args = complete(args, kwargs)
        check(*args)
        return reference(*args)

    torch.library.register_fake(qualname, lib=_LIB)(fake)
    _LIB.impl(spec.name, default, "CompositeExplicitAutograd")
    for device_type in ("cpu", "cuda"):
        name = kernel_backend(spec, device_type)
        _KERNELS[spec.name, device_type] = name
        if name in ("reference", "native"):
            continue  # the default kernel, or registered from C++
        _LIB.impl(spec.name, _override(spec, arguments, spec.backends[name], device_type,
                                       reference), device_type.upper())
    REGISTRY[spec.name] = spec
    _BY_OVERLOAD[overload] = (spec, arguments)
    return spec


def _override(spec, arguments, backend, device_type, reference):
    """The device kernel of a Python backend: checks, then the backend where it can take the
    inputs (dtype, `supports`), else the reference."""
    check, run, supports = spec.check, backend.run, backend.supports
    dtypes = backend.dtypes[device_type]
    count = len(arguments)
    complete = _completer(arguments)
    if supports is None:
        def kernel(*args, **kwargs):
            if len(args) != count or kwargs:  # the dispatcher drops trailing defaults
                args = complete(args, kwargs)
            lead = check(*args)
            return run(*args) if lead.dtype in dtypes else reference(*args)
    else:
        def kernel(*args, **kwargs):
            if len(args) != count or kwargs:
                args = complete(args, kwargs)
            lead = check(*args)
            ok = lead.dtype in dtypes and supports(*args) is None
            return run(*args) if ok else reference(*args)
    kernel.__name__ = f"{spec.name}_{device_type}"
    return kernel


# ---- forcing a backend; strict mode --------------------------------------------------------
def _complete(arguments, args, kwargs):
    """The op's arguments in schema order, defaults filled in (the dispatcher drops trailing
    arguments left at their defaults before it calls a Python kernel)."""
    if len(args) == len(arguments) and not kwargs:
        return args
    out = list(args)
    for a in arguments[len(args):]:
        if a.name in kwargs:
            out.append(kwargs[a.name])
        else:
            default = a.default_value
            out.append(list(default) if isinstance(default, list) else default)
    return tuple(out)


def _completer(arguments):
    """A fast `_complete` for one schema: the common call (positional, trailing defaults
    dropped) is one tuple concatenation; list defaults (int[2] stride=1) are shared as
    tuples, which no kernel mutates."""
    count = len(arguments)
    defaults = tuple(tuple(d) if isinstance(d, list) else d
                     for d in (a.default_value for a in arguments))

    def complete(args, kwargs):
        if kwargs:
            return _complete(arguments, args, kwargs)
        return args + defaults[len(args):] if len(args) < count else args
    return complete


def _is_plain(t):
    return not isinstance(t, torch.Tensor) or (type(t) is torch.Tensor and not t.is_meta)


_STRICT = [0]  # how many strict() blocks (and LOWRANK_STRICT) are active


class _Routing(TorchDispatchMode):
    """Routes torch.ops.lowrank_kernels.* to a forced backend and/or checks their results
    (strict); every other op, and calls on fake/meta tensors, pass through."""

    def __init__(self, backend=None, strict=False):
        super().__init__()
        if backend is not None and backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be one of 'auto', "
                             f"{', '.join(map(repr, BACKENDS))}; got {backend!r}")
        self.backend = None if backend == "auto" else backend
        self.strict = strict

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        entry = _BY_OVERLOAD.get(func)
        if entry is None or not all(_is_plain(a) for a in args):
            return func(*args, **(kwargs or {}))
        spec, arguments = entry
        args = _complete(arguments, args, kwargs or {})
        lead = spec.check(*args)
        if self.backend is None:
            result = func(*args)
        else:
            name = choose_backend(spec, _device_type(lead), lead.dtype, self.backend, args)
            result = spec.backends[name].run(*args)
        if self.strict or _STRICT[0]:  # also when a forced backend runs inside strict()
            raise_if_nonfinite(spec, result, arguments, args)
        return result


def _all_finite(tensors):
    floats = [t for t in tensors if isinstance(t, torch.Tensor) and t.dtype in _FLOAT]
    return all(bool(torch.isfinite(t).all()) for t in floats)


def raise_if_nonfinite(spec, result, arguments, args):
    """Strict mode's check: NonFiniteError when a result has NaN/Inf, naming the first
    non-finite input of spec.finite_inputs."""
    outs = result if isinstance(result, tuple) else (result,)
    if _all_finite(outs):
        return
    for a, value in zip(arguments, args):
        if a.name in spec.finite_inputs and value is not None and not _all_finite([value]):
            raise NonFiniteError(f"{spec.name}: {a.name} contains non-finite values (NaN or "
                                 "Inf)", spec.name, a.name)
    raise NonFiniteError(f"{spec.name}: the result is not finite although every input is "
                         "(overflow of the fp32 accumulator: rescale the inputs)", spec.name)


@contextlib.contextmanager
def use_backend(backend: str):
    """Run every lowrank_kernels op inside the block on `backend` ('reference', 'cpu',
    'triton', 'native'; 'auto': the default kernels), raising BackendUnavailableError where
    it cannot run."""
    with _Routing(backend=backend):
        yield


@contextlib.contextmanager
def strict():
    """Check the result of every lowrank_kernels op inside the block for NaN/Inf (one host
    sync per op) and raise NonFiniteError naming the non-finite input."""
    _STRICT[0] += 1
    try:
        with _Routing(strict=True):
            yield
    finally:
        _STRICT[0] -= 1


def on_backend(op, backend, *tracked):
    """op itself for backend None (the default kernels: the entry point adds nothing to the
    call), else op run on `backend` — the `backend=` argument of the Python entry points,
    `on_backend(_OP, backend)(*args)`. tracked: the inputs autograd tracks, for an op with an
    autograd formula (torch.library.register_autograd: a Python kernel of ~5 µs per call even
    without grad); when none of them requires grad the default kernels are called below the
    autograd layer, which would record nothing."""
    if backend is None:
        if tracked and not _records_grad(tracked):
            return _below_autograd(op)
        return op

    def forced(*args):
        with _Routing(backend=backend):
            return op(*args)
    return forced


def _records_grad(tensors):
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return True
    # while compiling the traced graph calls the op itself: the autograd layer is AOT's
    return torch.compiler.is_compiling()


_BELOW_AUTOGRAD: dict = {}  # op -> op called below the autograd layer
# The autograd keys of every backend, excluded from dispatch in this thread for one call (as
# torch._C._AutoDispatchBelowAutograd does; that context manager costs ~1.7 µs from Python,
# these two calls ~0.5 µs).
_AUTOGRAD_KEYS = torch._C.DispatchKey.AutogradFunctionality
_is_excluded = torch._C._dispatch_tls_is_dispatch_key_excluded
_set_excluded = torch._C._dispatch_tls_set_dispatch_key_excluded


def _below_autograd(op):
    run = _BELOW_AUTOGRAD.get(op)
    if run is None:
        def run(*args):
            if _is_excluded(_AUTOGRAD_KEYS):  # already below it (inside an autograd kernel)
                return op(*args)
            _set_excluded(_AUTOGRAD_KEYS, True)
            try:
                return op(*args)
            finally:
                _set_excluded(_AUTOGRAD_KEYS, False)
        _BELOW_AUTOGRAD[op] = run
    return run


def _environment_mode():
    """LOWRANK_BACKEND / LOWRANK_STRICT=1 set before the import: one mode for the process."""
    backend = os.environ.get("LOWRANK_BACKEND") or None
    strict_on = os.environ.get("LOWRANK_STRICT", "0") == "1"
    if backend is None and not strict_on:
        return None
    mode = _Routing(backend=backend, strict=strict_on)
    _STRICT[0] += int(strict_on)
    mode.__enter__()  # left on for the process
    return mode


def backend_table():
    """{op: {device: the backend its kernel runs}} for the bug report."""
    table = {}
    for name in REGISTRY:
        row = {}
        for device_type in ("cpu", "cuda"):
            backend = _KERNELS[name, device_type]
            row[device_type] = backend + ("" if device_type == "cpu" or caps.cuda_available()
                                          else " (no GPU here)")
        table[name] = row
    return table
