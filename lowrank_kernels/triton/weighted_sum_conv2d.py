"""Launcher of the weighted sum of per-sample gradients of a Conv2d: the linear-layer kernel of
triton/weighted_sum_linear.py, reading the input by implicit im2col."""
from .token_rows import conv2d_tokens, output_tokens
from .weighted_sum_linear import weighted_sum_tokens


def weighted_sum_conv2d(X, E, c, kernel_size, stride, padding, dilation, groups, bias=False):
    """U c for a Conv2d in fp32: (W ([m,] C_out, C_in/groups, kh, kw), bias part ([m,] C_out)
    or None); X (B, C_in, H, W), E (B, C_out, H_out, W_out), c (B,) or (B, m)."""
    t = conv2d_tokens(X, kernel_size, stride, padding, dilation, groups, tuple(E.shape[2:]))
    W, b = weighted_sum_tokens(t, output_tokens(E), c if c.dim() == 2 else c[:, None], groups,
                               bias)
    W = W.unflatten(-1, (X.shape[1] // groups, kernel_size[0], kernel_size[1]))
    if c.dim() == 1:
        return W[0], (b[0] if bias else None)
    return W, b
