"""Argument handling shared by the Conv2d members of the per-sample-gradient family."""
import torch

from .. import _checks


def pair(op, name, value, minimum):
    """An int or a pair of ints (each ≥ minimum) as a list of two ints."""
    integer = (int, torch.SymInt)  # SymInt: a kernel size read from V's shape while tracing
    values = [value, value] if isinstance(value, integer) else list(value)
    if len(values) != 2 or not all(isinstance(v, integer) and v >= minimum for v in values):
        raise ValueError(f"{op}: {name} must be an int or a pair of ints ≥ {minimum}, "
                         f"got {value!r}")
    return values


def output_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def check_conv2d(op, X, E, kernel_size, stride, padding, dilation, groups, x_name="X"):
    """X (B, C_in, H, W) and E (B, C_out, H_out, W_out) of one Conv2d call: ranks, dtypes,
    devices, the batch, channels divisible by groups, and H_out, W_out as the geometry gives."""
    _checks.check_tensor(op, x_name, X, 4, "B x C_in x H x W: the layer input")
    _checks.check_tensor(op, "E", E, 4, "B x C_out x H_out x W_out: the output gradient")
    _checks.check_float(op, x_name, X)
    _checks.check_float(op, "E", E)
    _checks.check_same(op, (x_name, "E"), (X, E), "device")
    _checks.check_same(op, (x_name, "E"), (X, E), "dtype")
    _checks.check_dim_match(op, x_name, X.shape[0], "E", E.shape[0], "batch size B (dim 0)")
    kernel_size = pair(op, "kernel_size", kernel_size, 1)
    stride = pair(op, "stride", stride, 1)
    padding = pair(op, "padding", padding, 0)
    dilation = pair(op, "dilation", dilation, 1)
    if not isinstance(groups, int) or groups < 1 or X.shape[1] % groups or E.shape[1] % groups:
        raise ValueError(f"{op}: groups must be a positive int dividing C_in ({X.shape[1]}) "
                         f"and C_out ({E.shape[1]}), got {groups!r}")
    expected = tuple(output_size(X.shape[2 + d], kernel_size[d], stride[d], padding[d],
                                 dilation[d]) for d in range(2))
    if tuple(E.shape[2:]) != expected or min(expected) < 1:
        raise ValueError(f"{op}: E must be the gradient of the conv output, of spatial size "
                         f"{expected} for {x_name} {tuple(X.shape[2:])} with kernel_size "
                         f"{kernel_size}, stride {stride}, padding {padding}, dilation "
                         f"{dilation}; got {tuple(E.shape[2:])}")
    return kernel_size, stride, padding, dilation
