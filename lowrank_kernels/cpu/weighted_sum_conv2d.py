"""CPU weighted_sum_conv2d: U c = Σ_i c_i g_i for a Conv2d through unfold and the CPU grouped linear weighted
sum (its cheaper route: per-sample weight gradients when T = H_out·W_out and m exceed 1)."""
from ..reference.conv2d_tokens import input_tokens, output_tokens
from .weighted_sum_linear import weighted_sum_linear


def weighted_sum_conv2d(X, E, c, kernel_size, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                        groups=1, bias=False):
    """U c = Σ_i c_i g_i for a Conv2d: the weight part ([m,] C_out, C_in/groups, kh, kw) and the
    bias part ([m,] C_out) or None (as lowrank_kernels.reference.weighted_sum_conv2d)."""
    A = input_tokens(X, kernel_size, stride, padding, dilation)
    W, b = weighted_sum_linear(A, output_tokens(E), c, bias, groups)
    return W.unflatten(-1, (X.shape[1] // groups, kernel_size[0], kernel_size[1])), b
