"""Reference project_conv2d: pure PyTorch, float64-capable, any device."""
from .conv2d_tokens import input_tokens, output_tokens
from .project_linear import project_linear


def project_conv2d(X, E, V, V_bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                   groups=1):
    """(Uᵀ V)_i = ⟨g_i, V⟩ for a Conv2d: V ([m,] C_out, C_in/groups, kh, kw) (its last two dims
    are the kernel size), V_bias ([m,] C_out); through unfold and the grouped linear projection.
    Returns (B,) or (B, m)."""
    A = input_tokens(X, tuple(V.shape[-2:]), stride, padding, dilation)
    return project_linear(A, output_tokens(E), V.flatten(-3), V_bias, groups)
