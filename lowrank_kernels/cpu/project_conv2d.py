"""CPU project_conv2d: (Uᵀ V)_i = ⟨g_i, V⟩ for a Conv2d through unfold and the CPU grouped linear projection
(its cheaper route: per-sample weight gradients when T = H_out·W_out and m exceed 1)."""
from ..reference.conv2d_tokens import input_tokens, output_tokens
from .project_linear import project_linear


def project_conv2d(X, E, V, V_bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                   groups=1):
    """(Uᵀ V)_i = ⟨g_i, V⟩ for a Conv2d: V ([m,] C_out, C_in/groups, kh, kw), V_bias ([m,] C_out)
    (as lowrank_kernels.reference.project_conv2d). Returns (B,) or (B, m)."""
    A = input_tokens(X, tuple(V.shape[-2:]), stride, padding, dilation)
    return project_linear(A, output_tokens(E), V.flatten(-3), V_bias, groups)
