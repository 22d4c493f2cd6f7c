"""Argument checks shared by every op: each error names the op, the argument and what was
expected, so bad input never becomes a segfault or a silent wrong answer."""
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(op, name, t, ndim=None, shape_doc=""):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
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
    return os.environ.get("LOWRANK_CHECK_FINITE", "1") != "0"


def raise_if_nonfinite(op, result, named_inputs):
    """If result has NaN/Inf, raise naming the first input that has them (one sync on the
    small result; inputs are scanned only on failure)."""
    if not finite_checks_enabled() or bool(torch.isfinite(result).all()):
        return
    for name, t in named_inputs:
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{op}: {name} contains non-finite values (NaN or Inf)")
    raise FloatingPointError(
        f"{op}: the result is not finite although every input is (overflow of the fp32 "
        "accumulator: rescale the inputs)")
