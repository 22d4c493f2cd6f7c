"""Argument checks shared by every op: each error names the op, the argument and what was
expected, so bad input never becomes a segfault or a silent wrong answer.

They run on every call of every op: the passing path is kept to a few attribute reads and
comparisons, the error messages are built only when raising."""
import math
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_ENVIRON = os.environ
_ENV_DATA = getattr(_ENVIRON, "_data", None)
_ENV_KEYS: dict = {}


def getenv(name: str, default=None):
    """os.environ.get(name, default), without its per-call key encoding and KeyError (the
    registry reads a few variables on every call). Falls back to os.environ.get when
    os.environ is not CPython's mapping (replaced, or another implementation)."""
    env = os.environ
    if env is _ENVIRON and _ENV_DATA is not None:
        key = _ENV_KEYS.get(name)
        if key is None:
            key = _ENV_KEYS[name] = env.encodekey(name)
        value = _ENV_DATA.get(key)
        return default if value is None else env.decodevalue(value)
    return env.get(name, default)


def check_tensor(op, name, t, ndim=None, shape_doc=""):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        dim = t.dim()
        if dim != ndim if isinstance(ndim, int) else dim not in ndim:
            want = ndim if isinstance(ndim, int) else " or ".join(str(n) for n in ndim)
            raise ValueError(
                f"{op}: {name} must be a {want}-D tensor ({shape_doc}), "
                f"got shape {tuple(t.shape)}")


def check_float(op, name, t, dtypes=FLOAT_DTYPES):
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have a floating dtype ({names}), got {t.dtype}")


def check_same(op, names, tensors, what):
    """what: 'device' or 'dtype'; all tensors must agree."""
    if type(tensors) is not tuple and type(tensors) is not list:
        tensors = tuple(tensors)
    if len(tensors) == 2 and not getattr(tensors[0], what) != getattr(tensors[1], what):
        return
    values = [getattr(t, what) for t in tensors]
    if any(v != values[0] for v in values):
        listing = ", ".join(f"{n}: {v}" for n, v in zip(names, values))
        raise ValueError(f"{op}: {' and '.join(names)} must have the same {what}, got {listing}")


def check_dim_match(op, name_a, size_a, name_b, size_b, what):
    if size_a != size_b:
        raise ValueError(f"{op}: {name_a} and {name_b} must have the same {what}, "
                         f"got {size_a} and {size_b}")


def finite_checks_enabled() -> bool:
    """LOWRANK_CHECK_FINITE=0 turns off the non-finite checks (they cost a device sync)."""
    return getenv("LOWRANK_CHECK_FINITE", "1") != "0"


def all_finite(*tensors: torch.Tensor) -> bool:
    """True iff no tensor has NaN or ±Inf (exact), at the cost of one reduction per
    float32/float64/float16/bfloat16 tensor and one host sync in all.

    The sum is the test: NaN and ±Inf propagate through every addition (Inf + finite = Inf,
    Inf − Inf = NaN, NaN + anything = NaN), so a finite sum of the sums means finite elements.
    A sum of finite elements that overflows is not finite either: then torch.isfinite decides,
    so overflow never gives a false alarm. Integer and bool tensors are always finite."""
    total = None
    for t in tensors:
        if t.dtype in FLOAT_DTYPES:
            total = t.sum() if total is None else total + t.sum()
        elif (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return False  # float8 and complex: no shortcut
    if total is None or math.isfinite(total.item()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.dtype in FLOAT_DTYPES)


def raise_if_nonfinite(op, result, named_inputs):
    """If result has NaN/Inf, raise naming the first input that has them (one sync on the
    small result; inputs are scanned only on failure)."""
    if not finite_checks_enabled() or all_finite(result):
        return
    for name, t in named_inputs:
        if t is not None and t.is_floating_point() and not all_finite(t):
            raise ValueError(f"{op}: {name} contains non-finite values (NaN or Inf)")
    raise FloatingPointError(
        f"{op}: the result is not finite although every input is (overflow of the fp32 "
        "accumulator: rescale the inputs)")
