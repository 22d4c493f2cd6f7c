"""The public ops (torch.ops.lowrank_kernels.*) and their Python entry points."""
from .gram_linear import gram_linear

__all__ = ["gram_linear"]
