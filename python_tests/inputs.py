"""Test inputs shared by the kernel tests: seeded float64 draws cast to the dtype under test,
and non-contiguous copies."""
import torch


def rand(*shape, dtype, seed):
    """A standard normal draw in float64 (seeded), cast to dtype."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def noncontiguous(X):
    """X's values in a tensor whose last dim has stride 2."""
    wide = torch.zeros(*X.shape[:-1], 2 * X.shape[-1], dtype=X.dtype)
    wide[..., ::2] = X
    return wide[..., ::2]
