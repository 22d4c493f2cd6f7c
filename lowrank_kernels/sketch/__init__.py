"""Randomized sketching: range finder, randomized SVD/eigh, orthonormalization, and sketches
of per-sample gradients. The first sketch Y = M Ω uses the counter-based Ω of
lowrank_kernels.sketch_matmul / sketch_omega (generated in-kernel, never stored)."""
from .orthonormalize import OrthoInfo, orthonormalize
from .per_sample import (kronecker_sketch, kronecker_sketch_gram, project_per_sample_gradients,
                         token_subsample, token_subsample_gram)
from .randomized_svd import randomized_eigh, randomized_svd
from .range_finder import LinearOperator, SketchStats, range_finder

__all__ = ["LinearOperator", "OrthoInfo", "SketchStats", "kronecker_sketch",
           "kronecker_sketch_gram", "orthonormalize", "project_per_sample_gradients",
           "randomized_eigh", "randomized_svd", "range_finder", "token_subsample",
           "token_subsample_gram"]
