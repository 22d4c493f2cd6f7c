"""Subspace training: TWA subspaces from checkpoints (build_subspace, CheckpointCollector;
the optimizer is lowrank_kernels.optim.TWA), random-subspace / intrinsic-dimension training
(SubspaceModel with dense, sparse, Fastfood or on-the-fly projections; intrinsic_dimension),
and BatchNorm recomputation after the weights moved."""
from .batchnorm import recompute_batchnorm
from .checkpoints import CheckpointCollector, Subspace, build_subspace, flatten_parameters
from .intrinsic import IntrinsicDimension, intrinsic_dimension, plot_intrinsic_dimension
from .model import SubspaceModel
from .projections import (DenseProjection, FastfoodProjection, OnTheFlyProjection,
                          SparseProjection, make_projection)

__all__ = ["CheckpointCollector", "DenseProjection", "FastfoodProjection", "IntrinsicDimension",
           "OnTheFlyProjection", "SparseProjection", "Subspace", "SubspaceModel",
           "build_subspace", "flatten_parameters", "intrinsic_dimension", "make_projection",
           "plot_intrinsic_dimension", "recompute_batchnorm"]
