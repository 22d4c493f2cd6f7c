"""CPU gram_conv2d: the per-sample-gradient Gram of a Conv2d through unfold and the CPU grouped linear Gram
(route 'auto': the cheaper of token pair and per-sample gradients by its cost model)."""
from ..reference.conv2d_tokens import input_tokens, output_tokens
from .gram_linear import gram_linear


def gram_conv2d(X, E, kernel_size, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                bias=False, X2=None, E2=None, diagonal=False, route="token_pair"):
    """K_ij = ⟨g_i, h_j⟩ for the per-sample gradients of a Conv2d weight (and bias), as
    lowrank_kernels.reference.gram_conv2d; route 'token_pair', 'per_sample' or 'auto'."""
    def tokens(X, E):
        return input_tokens(X, kernel_size, stride, padding, dilation), output_tokens(E)

    A, Et = tokens(X, E)
    A2, Et2 = tokens(X2, E2) if X2 is not None else (None, None)
    return gram_linear(A, Et, bias, A2, Et2, diagonal, route, groups)
