"""The public ops (torch.ops.lowrank_kernels.*) and their Python entry points."""
# ---- Gram family ----
from .gram_linear import gram_linear

# ---- weighted sums and projections ----

# ---- Woodbury solves ----

# ---- sketches ----

__all__ = [name for name in dir() if not name.startswith("_")]
