"""Fast Walsh–Hadamard transform."""
import torch


def fwht(x: torch.Tensor) -> torch.Tensor:
    """y = H_n x along the last dimension (n a power of two), H_n the unnormalized Sylvester
    Hadamard matrix, (H_n)_{ij} = (−1)^{popcount(i & j)}; log₂ n butterfly stages
    (a, b) → (a + b, a − b). Computed in float32 (float64 for float64), returned in x's dtype."""
    n = x.shape[-1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(dtype).reshape(-1, n)
    h = 1
    while h < n:
        pairs = y.view(-1, n // (2 * h), 2, h)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2).view(-1, n)
        h *= 2
    return y.view(x.shape).to(x.dtype)
