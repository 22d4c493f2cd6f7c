"""lowrank_kernels::project_conv2d — the per-sample projections of a Conv2d layer,
(Uᵀ V)_i = ⟨g_i, V⟩ = Σ_groups Σ_t e_itᵀ V_g ã_it (+ Σ_t e_it·v_b), ã_it the receptive field of
output pixel t (im2col of X), for a weight-shaped direction V (C_out, C_in/groups, kh, kw)
-> (B,) or m of them (m, C_out, C_in/groups, kh, kw) -> (B, m); the kernel size is V's.
The Triton kernel reads X by implicit im2col. Output float32 (float64 for float64 inputs on the
reference backend).
"""
import torch

from .. import _checks
from .._registry import OpSpec, on_backend, register
from ..reference.project_conv2d import project_conv2d as reference_project
from ._common import (check_conv2d, check_directions, conv_geometry, fake_projection,
                      layer_backends, native_check, pair)

OP = "project_conv2d"


def check(X, E, V, V_bias, geometry):
    if _NATIVE_CHECK is not None and _NATIVE_CHECK(X, E, V, V_bias, geometry):
        return X
    if type(V) is not torch.Tensor or not 4 <= V.dim() <= 5:
        _checks.check_tensor(OP, "V", V, (4, 5), "C_out x C_in/groups x kh x kw or m x that: "
                                                 "weight-shaped directions")
    v = V.shape
    kh, kw = v[-2], v[-1]
    C_in, C_out = check_conv2d(OP, X, E, geometry, (kh, kw))
    check_directions(OP, V, V_bias, (C_out, C_in // geometry[6], kh, kw), E)
    return X


def fake(X, E, V, V_bias, geometry):
    return fake_projection(X, V, 4)


def _reference(X, E, V, V_bias, geometry):
    sh, sw, ph, pw, dh, dw, groups = geometry
    return reference_project(X, E, V, V_bias, (sh, sw), (ph, pw), (dh, dw), groups)


def _triton(X, E, V, V_bias, geometry):
    from ..triton.project_conv2d import project_conv2d as triton_project

    sh, sw, ph, pw, dh, dw, groups = geometry
    return triton_project(X, E, V, V_bias, (sh, sw), (ph, pw), (dh, dw), groups)


SPEC = register(OpSpec(
    name=OP,
    # geometry: [stride_h, stride_w, padding_h, padding_w, dilation_h, dilation_w, groups]
    # (ops._common.conv_geometry; the kernel size is V's)
    schema="(Tensor X, Tensor E, Tensor V, Tensor? V_bias, int[] geometry) -> Tensor",
    check=check,
    fake=fake,
    **layer_backends(_reference, _triton, native_cpu=True),
    finite_inputs=("X", "E", "V", "V_bias"),
))
_OP = torch.ops.lowrank_kernels.project_conv2d.default
_NATIVE_CHECK = native_check("check_project_conv2d")


def project_conv2d(X: torch.Tensor, E: torch.Tensor, V: torch.Tensor, V_bias=None,
                   kernel_size=None, stride=1, padding=0, dilation=1, groups: int = 1, *,
                   backend: str | None = None):
    """Per-sample projections of a Conv2d, (Uᵀ V)_i = ⟨g_i, V⟩ (+ the bias part with V_bias).

    X: (B, C_in, H, W) layer input, E: (B, C_out, H_out, W_out) output gradient;
    V: (C_out, C_in/groups, kh, kw) -> (B,), or (m, C_out, C_in/groups, kh, kw) -> (B, m);
    V_bias: (C_out,) or (m, C_out). kernel_size: optional, must equal V's (kh, kw).
    backend: None (the device's kernel), or force 'reference' / 'triton' (see use_backend).
    Returns float32 (float64 for float64 inputs)."""
    if kernel_size is not None:
        kernel_size = pair(OP, "kernel_size", kernel_size, 1)
        if V.dim() < 2 or list(V.shape[-2:]) != kernel_size:
            raise ValueError(f"{OP}: kernel_size {kernel_size} must equal V's last two dims "
                             f"(kh, kw), got V of shape {tuple(V.shape)}")
    geometry = conv_geometry(OP, None, stride, padding, dilation, groups)
    return on_backend(_OP, backend)(X, E, V, V_bias, geometry)
