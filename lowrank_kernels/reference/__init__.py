"""Pure-PyTorch kernels: float64-capable, any device. The test oracle and the fallback."""
from .gram_linear import gram_linear

__all__ = ["gram_linear"]
