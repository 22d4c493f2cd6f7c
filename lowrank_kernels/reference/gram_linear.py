import torch


def gram_linear(A: torch.Tensor, E: torch.Tensor, bias: bool = False) -> torch.Tensor:
    """K = (A Aᵀ + b) ⊙ (E Eᵀ), b = 1 with a bias column: the Gram of the per-sample gradients
    g_i = e_i a_iᵀ of a linear layer. A: B×d_in, E: B×d_out; float64 in gives float64 out,
    anything else is computed and returned in float32."""
    dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    A, E = A.to(dtype), E.to(dtype)
    K = A @ A.T
    if bias:
        K += 1.0
    return K.mul_(E @ E.T)
