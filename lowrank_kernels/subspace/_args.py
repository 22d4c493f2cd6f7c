"""Argument checks of the subspace API: each error names the function, the argument and
what was expected (a bool is not taken for a number)."""
import math
import numbers

import torch


def positive_int(op, name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{op}: {name} must be ≥ 1 (a positive int), got {value!r}")
    return value


def seed(op, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 63:
        raise ValueError(f"{op}: seed must be an int in [0, 2**63), got {value!r}")
    return value


def float_dtype(op, name, value):
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise TypeError(f"{op}: {name} must be a floating-point torch.dtype, got {value!r}")
    return value


def real_in(op, name, value, low, high, low_open=True):
    """A finite real in (low, high] (or [low, high] with low_open=False), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__} "
                        f"{value!r}")
    value = float(value)
    ok = math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{op}: {name} must be in {interval}, got {value!r}")
    return value
