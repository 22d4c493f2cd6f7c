"""Capture of per-sample gradients for any nn.Module: `Capture(model)` records the inputs and
output gradients of its layers during a normal forward and backward, and gives the whole-model
or per-layer per-sample-gradient Gram (and its diagonal, and cross-Grams of two batches), the
weighted sums U c (returned, or written into .grad) and the projections Uᵀ V, through the
lowrank_kernels ops — the per-sample gradients of big layers are never materialized."""
from ._capture import SUPPORTED, Capture

__all__ = ["Capture", "SUPPORTED"]
