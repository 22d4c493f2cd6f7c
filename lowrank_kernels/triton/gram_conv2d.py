"""Launcher of the per-sample-gradient Gram of a Conv2d: the linear-layer Gram kernels of
triton/gram_linear.py, reading the input by implicit im2col (nothing unfolded in memory)."""
from .gram_linear import gram_tokens
from .token_rows import conv2d_tokens, output_tokens


def gram_conv2d(X, E, kernel_size, stride, padding, dilation, groups, bias=False, X2=None,
                E2=None, diagonal=False, route="token_pair"):
    """K_ij = ⟨g_i, h_j⟩ (or diag) in fp32 for a Conv2d's weight (and bias) per-sample gradients;
    X (B, C_in, H, W), E (B, C_out, H_out, W_out); route "token_pair" or "per_sample"."""
    geometry = (kernel_size, stride, padding, dilation, groups, tuple(E.shape[2:]))
    t1, E1 = conv2d_tokens(X, *geometry), output_tokens(E)
    t2, Et2 = (conv2d_tokens(X2, *geometry), output_tokens(E2)) if X2 is not None else (t1, E1)
    return gram_tokens(t1, E1, t2, Et2, groups, bias, diagonal, route)
