"""lowrank_kernels::gram_conv2d — the per-sample-gradient Gram of a Conv2d layer:

    K_ij = ⟨g_i, g_j⟩ = Σ_groups Σ_{t,s} (ã_it·ã_js)(e_it·e_js),

with ã_it the receptive field of output pixel t in sample i (im2col of X, one group's channels,
plus a 1 with bias) and e_it the output gradient there: a linear layer over T = H_out·W_out
tokens, one per group (the weight is block diagonal). With X2/E2 the cross-Gram (B × B2);
diagonal=True the per-sample squared gradient norms (with X2/E2 of the same B: ⟨g_i, h_i⟩).
Output float32 (float64 for float64 inputs on the reference backend). The Triton kernels read
X by implicit im2col; the route (token pair or per sample) is chosen by
ops._common.choose_route (the C++ CPU kernel, csrc/gram_conv2d.cpp: im2col, then the token
core of gram_linear on the route of its CPU cost model).
"""
import torch

from .._registry import OpSpec, on_backend, register
from ..reference.gram_conv2d import gram_conv2d as reference_gram_conv2d
from ._common import (check_conv2d, check_cross, choose_route, conv_geometry, layer_backends,
                      native_check)

OP = "gram_conv2d"


def check(X, E, geometry, bias, X2, E2, diagonal):
    if _NATIVE_CHECK is None or not _NATIVE_CHECK(X, E, geometry, X2, E2, diagonal):
        check_conv2d(OP, X, E, geometry)
        if X2 is not None or E2 is not None:
            check_cross(OP, ("X2", "E2"), (X, E), (X2, E2), diagonal)
    return X


def fake(X, E, geometry, bias, X2, E2, diagonal):
    dtype = torch.float64 if X.dtype == torch.float64 else torch.float32
    B2 = (X2 if X2 is not None else X).shape[0]
    return X.new_empty((X.shape[0],) if diagonal else (X.shape[0], B2), dtype=dtype)


def _route(X, E, kh, kw, groups, bias, X2, diagonal):
    B2 = (X2 if X2 is not None else X).shape[0]
    return choose_route(X.shape[0], B2, E.shape[2] * E.shape[3],
                        X.shape[1] // groups * kh * kw, E.shape[1] // groups, groups, bias,
                        X2 is not None, diagonal)


def _reference(X, E, geometry, bias, X2, E2, diagonal):
    kh, kw, sh, sw, ph, pw, dh, dw, groups = geometry
    return reference_gram_conv2d(X, E, (kh, kw), (sh, sw), (ph, pw), (dh, dw), groups, bias,
                                 X2, E2, diagonal,
                                 _route(X, E, kh, kw, groups, bias, X2, diagonal))


def _triton(X, E, geometry, bias, X2, E2, diagonal):
    from ..triton.gram_conv2d import gram_conv2d as triton_gram_conv2d

    kh, kw, sh, sw, ph, pw, dh, dw, groups = geometry
    return triton_gram_conv2d(X, E, (kh, kw), (sh, sw), (ph, pw), (dh, dw), groups, bias,
                              X2, E2, diagonal,
                              _route(X, E, kh, kw, groups, bias, X2, diagonal))


SPEC = register(OpSpec(
    name=OP,
    # geometry: [kh, kw, stride_h, stride_w, padding_h, padding_w, dilation_h, dilation_w,
    # groups] (ops._common.conv_geometry)
    schema="(Tensor X, Tensor E, int[] geometry, bool bias=False, Tensor? X2=None, "
           "Tensor? E2=None, bool diagonal=False) -> Tensor",
    check=check,
    fake=fake,
    **layer_backends(_reference, _triton, native_cpu=True),  # CPU: csrc/gram_conv2d.cpp
    finite_inputs=("X", "E", "X2", "E2"),
))
_OP = torch.ops.lowrank_kernels.gram_conv2d.default
_NATIVE_CHECK = native_check("check_gram_conv2d")


def gram_conv2d(X: torch.Tensor, E: torch.Tensor, kernel_size, stride=1, padding=0,
                dilation=1, groups: int = 1, bias: bool = False, *, X2=None, E2=None,
                diagonal: bool = False, backend: str | None = None):
    """Per-sample-gradient Gram of a Conv2d, K_ij = ⟨g_i, g_j⟩ = Σ_g Σ_{t,s} (ã_it·ã_js)(e_it·e_js)
    (ã: im2col of X per group, with a 1 appended when bias).

    X: (B, C_in, H, W) layer input, E: (B, C_out, H_out, W_out) output gradient; kernel_size,
    stride, padding, dilation: ints or pairs (zero padding, as nn.Conv2d's numeric padding).
    X2/E2: a second batch, for the cross-Gram (B × B2). diagonal: return diag(K) (B).
    backend: None (the device's kernel), or force 'reference' / 'triton' (see use_backend).
    Returns float32 (float64 for float64 inputs)."""
    geometry = conv_geometry(OP, kernel_size, stride, padding, dilation, groups)
    return on_backend(_OP, backend)(X, E, geometry, bias, X2, E2, diagonal)
