"""Launcher of the per-sample projections of a Conv2d: the linear-layer kernel of
triton/project_linear.py, reading the input by implicit im2col."""
from .project_linear import project_tokens
from .token_rows import conv2d_tokens, output_tokens


def project_conv2d(X, E, V, V_bias, stride, padding, dilation, groups):
    """Uᵀ V in fp32 for a Conv2d: V ([m,] C_out, C_in/groups, kh, kw) -> (B[, m]); V_bias
    ([m,] C_out) or None; X (B, C_in, H, W), E (B, C_out, H_out, W_out)."""
    t = conv2d_tokens(X, tuple(V.shape[-2:]), stride, padding, dilation, groups,
                      tuple(E.shape[2:]))
    Vm = (V if V.dim() == 5 else V[None]).flatten(2)
    vb = None if V_bias is None else (V_bias if V_bias.dim() == 2 else V_bias[None])
    out = project_tokens(t, output_tokens(E), Vm, vb, groups)
    return out if V.dim() == 5 else out[:, 0]
