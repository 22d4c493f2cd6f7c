"""Capture of per-sample gradients for any nn.Module: `Capture(model)` records the inputs and
output gradients of its layers during a normal forward and backward, and gives the whole-model
or per-layer per-sample-gradient Gram (and its diagonal, and cross-Grams of two batches), the
weighted sums U c (returned, or written into .grad) and the projections Uᵀ V, through the
lowrank_kernels ops — the per-sample gradients of big layers are never materialized.
`cap.factors()` gives each parameter's per-sample gradients as an immutable `Factors` (its
own Gram, U c, Uᵀ V, the layer's input and output-gradient tokens, a Kronecker sketch, and a
plain-tensor state_dict), which outlives the capture."""
from ._capture import SUPPORTED, Capture
from ._factors import Factors, LayerTokens

__all__ = ["Capture", "Factors", "LayerTokens", "SUPPORTED"]
