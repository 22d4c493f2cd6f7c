"""Subspace training: TWA subspaces from checkpoints, random-subspace (intrinsic dimension)
training with dense, sparse, Fastfood or on-the-fly random projections."""
from .batchnorm import recompute_batchnorm
from .checkpoints import CheckpointCollector, Subspace, build_subspace, flatten_parameters

__all__ = ["CheckpointCollector", "Subspace", "build_subspace", "flatten_parameters",
           "recompute_batchnorm"]
