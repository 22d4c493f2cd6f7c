"""lowrank_kernels::weighted_sum_conv2d — the weighted sum of the per-sample gradients of a
Conv2d layer, U c = Σ_i c_i g_i: per group, (c ⊙ E)ᵀ im2col(X) over all (i, output pixel)
rows, as a weight ([m,] C_out, C_in/groups, kh, kw) and, with bias, the bias part
Σ_{i,t} c_i e_it ([m,] C_out). The Triton kernel reads X by implicit im2col. Output float32
(float64 for float64 inputs on the reference backend).
"""
import torch

from .._registry import OpSpec, on_backend, register
from ..reference.weighted_sum_conv2d import weighted_sum_conv2d as reference_weighted_sum
from ._common import (check_coefficients, check_conv2d, conv_geometry, fake_outputs,
                      layer_backends, native_check)

OP = "weighted_sum_conv2d"


def check(X, E, c, geometry, bias):
    if _NATIVE_CHECK is None or not _NATIVE_CHECK(X, E, c, geometry):
        check_conv2d(OP, X, E, geometry)
        check_coefficients(OP, c, E)
    return X


def fake(X, E, c, geometry, bias):
    weight_shape = (E.shape[1], X.shape[1] // geometry[8], geometry[0], geometry[1])
    return fake_outputs(X, c, weight_shape, E.shape[1], bias)


def _reference(X, E, c, geometry, bias):
    kh, kw, sh, sw, ph, pw, dh, dw, groups = geometry
    return tuple(reference_weighted_sum(X, E, c, (kh, kw), (sh, sw), (ph, pw), (dh, dw),
                                        groups, bias))


def _triton(X, E, c, geometry, bias):
    from ..triton.weighted_sum_conv2d import weighted_sum_conv2d as triton_weighted_sum

    kh, kw, sh, sw, ph, pw, dh, dw, groups = geometry
    return tuple(triton_weighted_sum(X, E, c, (kh, kw), (sh, sw), (ph, pw), (dh, dw),
                                     groups, bias))


SPEC = register(OpSpec(
    name=OP,
    # geometry: [kh, kw, stride_h, stride_w, padding_h, padding_w, dilation_h, dilation_w,
    # groups] (ops._common.conv_geometry)
    schema="(Tensor X, Tensor E, Tensor c, int[] geometry, bool bias=False"
           ") -> (Tensor, Tensor?)",
    check=check,
    fake=fake,
    **layer_backends(_reference, _triton, native_cpu=True),
    finite_inputs=("X", "E", "c"),
))
_OP = torch.ops.lowrank_kernels.weighted_sum_conv2d.default
_NATIVE_CHECK = native_check("check_weighted_sum_conv2d")


def weighted_sum_conv2d(X: torch.Tensor, E: torch.Tensor, c: torch.Tensor, kernel_size,
                        stride=1, padding=0, dilation=1, groups: int = 1, bias: bool = False,
                        *, backend: str | None = None):
    """Weighted sum of a Conv2d's per-sample gradients, U c = Σ_i c_i g_i (per group
    (c ⊙ E)ᵀ im2col(X); the bias part Σ_{i,t} c_i e_it with bias).

    X: (B, C_in, H, W) layer input, E: (B, C_out, H_out, W_out) output gradient;
    c: (B,) -> ((C_out, C_in/groups, kh, kw), (C_out,)); c: (B, m) -> ((m, …), (m, C_out)).
    backend: None (the device's kernel), or force 'reference' / 'triton' (see use_backend).
    Returns (grad_weight, grad_bias or None), float32 (float64 for float64 inputs)."""
    geometry = conv_geometry(OP, kernel_size, stride, padding, dilation, groups)
    return on_backend(_OP, backend)(X, E, c, geometry, bias)
