"""Handlers of normalization layers: their affine parameters are small, so the per-sample
gradients are materialized, G_w[i] = Σ_t x̂_it ⊙ e_it and G_b[i] = Σ_t e_it, with x̂ the
normalized input recomputed from the captured input by PyTorch's own functional norms.

BatchNorm in train mode normalizes with the batch statistics, which couple the samples. The
capture then gives each sample's share of the batch gradient, g_i = ∂L/∂θ_i where sample i
runs through its own copy θ_i of the parameters (all equal to θ) and the batch statistics
are computed from the whole batch as in the forward pass: Σ_i g_i = ∇L exactly, and g_i
includes what flows back through the batch statistics into the layers before the norm. It is
not the gradient of ℓ_i alone (that is not defined without fixing the other samples). In eval
mode (running statistics) the samples are independent and g_i = ∇ℓ_i exactly.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ._kinds import DenseFactors


def _float_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _AffineNormHandler:
    """Shared: contributions from x̂ (B, …) and E; `channel_dims` says which dims hold the
    parameter (trailing normalized dims, or dim 1 for channels)."""

    def __init__(self, name, module, params):
        self.name, self.module, self.params = name, module, params

    def save(self, args, output):
        x = args[0].detach()
        if x.dim() < self.min_dim:
            raise ValueError(f"capture: module '{self.name}' got an input of shape "
                             f"{tuple(x.shape)}; the capture needs a leading batch dim")
        return x, self.state()

    def state(self):
        return None

    def contributions(self, saved, E, backend):
        x, state = saved
        dtype = _float_dtype(x)
        x, E = x.to(dtype), E.to(dtype)
        out = []
        if "weight" in self.params:
            out.append((self.params["weight"], DenseFactors(self.reduce(self.normalized(x, state) * E))))
        if "bias" in self.params:
            out.append((self.params["bias"], DenseFactors(self.reduce(E))))
        return out


class _TrailingNormHandler(_AffineNormHandler):
    """LayerNorm / RMSNorm: parameters over the trailing normalized_shape; sum over the rest."""
    min_dim = 2

    def reduce(self, Y):
        shape = tuple(self.module.normalized_shape)
        return Y.reshape(Y.shape[0], -1, *shape).sum(1)


class LayerNormHandler(_TrailingNormHandler):
    def normalized(self, x, state):
        m = self.module
        return F.layer_norm(x, m.normalized_shape, None, None, m.eps)


class RMSNormHandler(_TrailingNormHandler):
    def normalized(self, x, state):
        m = self.module
        return F.rms_norm(x, m.normalized_shape, None, m.eps)


class _ChannelNormHandler(_AffineNormHandler):
    """BatchNorm / GroupNorm: one parameter per channel (dim 1); sum over the other dims."""
    min_dim = 2

    def reduce(self, Y):
        return Y.reshape(Y.shape[0], Y.shape[1], -1).sum(2)


class BatchNormHandler(_ChannelNormHandler):
    def state(self):
        m = self.module
        # torch's rule: batch statistics in training mode or without running statistics.
        if m.training or m.running_mean is None:
            return None
        return m.running_mean.detach().clone(), m.running_var.detach().clone()

    def normalized(self, x, state):
        m = self.module
        if state is None:
            return F.batch_norm(x, None, None, training=True, eps=m.eps)
        mean, var = state
        return F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), training=False, eps=m.eps)


class GroupNormHandler(_ChannelNormHandler):
    def normalized(self, x, state):
        m = self.module
        return F.group_norm(x, m.num_groups, None, None, m.eps)


HANDLERS = {nn.LayerNorm: LayerNormHandler, nn.RMSNorm: RMSNormHandler,
            nn.BatchNorm1d: BatchNormHandler, nn.BatchNorm2d: BatchNormHandler,
            nn.BatchNorm3d: BatchNormHandler, nn.GroupNorm: GroupNormHandler}
