"""Reference gram_conv2d: pure PyTorch, float64-capable, any device."""
from .conv2d_tokens import input_tokens, output_tokens
from .gram_linear import gram_linear


def gram_conv2d(X, E, kernel_size, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                bias=False, X2=None, E2=None, diagonal=False, route="token_pair"):
    """K_ij = ⟨g_i, h_j⟩ for the per-sample gradients of a Conv2d weight (and bias): after
    unfold, g_i = Σ_t e_it ã_itᵀ per group (K = the sum of the groups' linear Grams).
    X (B, C_in, H, W), E (B, C_out, H_out, W_out); X2/E2 for the cross-Gram;
    diagonal=True returns diag(K). float64 in gives float64 out, anything else float32."""
    def tokens(X, E):
        return input_tokens(X, kernel_size, stride, padding, dilation), output_tokens(E)

    A, Et = tokens(X, E)
    A2, Et2 = tokens(X2, E2) if X2 is not None else (None, None)
    return gram_linear(A, Et, bias, A2, Et2, diagonal, route, groups)
