"""The public ops (torch.ops.lowrank_kernels.*) and their Python entry points."""
# ---- Gram family ----
from .gram_linear import gram_linear
from .gram_conv2d import gram_conv2d
from .gram_embedding import gram_embedding

# ---- weighted sums and projections ----
from .weighted_sum_linear import weighted_sum_linear
from .weighted_sum_conv2d import weighted_sum_conv2d
from .project_linear import project_linear
from .project_conv2d import project_conv2d
from .weighted_sum_embedding import weighted_sum_embedding
from .project_embedding import project_embedding

# ---- Woodbury solves ----
from .woodbury_solve import woodbury_solve

# ---- sketches ----
from .sketch_matmul import sketch_matmul
from .sketch_omega import sketch_omega

# ---- subspace ----
from .fwht import fwht
from .random_subspace import random_subspace_expand, random_subspace_project
from .subspace_project import subspace_expand, subspace_project

__all__ = [name for name in dir() if not name.startswith("_")]
