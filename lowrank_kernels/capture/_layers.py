"""Handlers of the layers whose weights keep factored per-sample gradients: nn.Linear,
nn.Conv2d, nn.Embedding. A handler saves what a call needs (`save`, at forward time) and turns
it and the call's output gradient E into contributions per parameter (`contributions`).
Biases are small: their per-sample gradients are materialized (Dense)."""
import torch
import torch.nn.functional as F
from torch import nn

from . import _kinds


def _batched(module_name, t, min_dim):
    """The layer input t, checked to have a leading batch dim (at least min_dim dims)."""
    if t.dim() < min_dim:
        raise ValueError(f"capture: module '{module_name}' got an input of shape "
                         f"{tuple(t.shape)}; the capture needs a leading batch dim "
                         f"(at least {min_dim}-D)")
    return t


class LinearHandler:
    """nn.Linear on x (B, *, d_in): weight g_i = Σ_t e_it a_itᵀ, bias g_i = Σ_t e_it."""

    def __init__(self, name, module, params):
        self.name, self.module, self.params = name, module, params

    def save(self, args, output):
        return _batched(self.name, args[0], 2).detach()

    def contributions(self, x, E, backend):
        B, d_out = x.shape[0], E.shape[-1]
        E = E.reshape(B, -1, d_out)
        out = []
        if "weight" in self.params:
            A = x.reshape(B, -1, x.shape[-1])
            out.append((self.params["weight"], _kinds.LinearFactors(A, E, backend)))
        if "bias" in self.params:
            out.append((self.params["bias"], _kinds.DenseFactors(_dense_dtype(E, E.sum(1)))))
        return out


class Conv2dHandler:
    """nn.Conv2d (any stride, padding, dilation, groups, padding mode) on x (B, C_in, H, W):
    weight through the conv2d ops, bias g_i = Σ_{h,w} e_i[:, h, w]."""

    def __init__(self, name, module, params):
        self.name, self.module, self.params = name, module, params

    def save(self, args, output):
        m = self.module
        x = _batched(self.name, args[0], 4).detach()
        padding = m.padding
        if m.padding_mode != "zeros":
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
            padding = (0, 0)
        elif isinstance(padding, str):
            if padding == "same":  # as torch: the odd pixel of an even total goes last
                pads = []
                for k, d in zip(reversed(m.kernel_size), reversed(m.dilation)):
                    total = d * (k - 1)
                    pads += [total // 2, total - total // 2]
                x = F.pad(x, pads)
            padding = (0, 0)
        geometry = (tuple(m.kernel_size), tuple(m.stride), tuple(padding), tuple(m.dilation),
                    m.groups)
        return x, geometry

    def contributions(self, saved, E, backend):
        x, geometry = saved
        out = []
        if "weight" in self.params:
            out.append((self.params["weight"], _kinds.Conv2dFactors(x, E, geometry, backend)))
        if "bias" in self.params:
            out.append((self.params["bias"], _kinds.DenseFactors(_dense_dtype(E, E.sum((2, 3))))))
        return out


class EmbeddingHandler:
    """nn.Embedding on idx (B, *): weight g_i = Σ_t onehot(idx_it) e_itᵀ (rows at padding_idx
    excluded), through the embedding ops."""

    def __init__(self, name, module, params):
        if module.scale_grad_by_freq:
            raise TypeError(f"capture: module '{name}' (nn.Embedding) has "
                            "scale_grad_by_freq=True: its gradient is scaled by counts over the "
                            "whole batch, so it has no per-sample decomposition; not supported")
        self.name, self.module, self.params = name, module, params

    def save(self, args, output):
        return _batched(self.name, args[0], 1).detach()

    def contributions(self, idx, E, backend):
        B = idx.shape[0]
        idx = idx.reshape(B, -1)
        E = E.reshape(B, idx.shape[1], E.shape[-1])
        m = self.module
        return [(self.params["weight"],
                 _kinds.EmbeddingFactors(idx, E, m.num_embeddings, m.padding_idx, backend))]


def _dense_dtype(reference, G):
    """Materialized per-sample gradients in float64 for float64 models, else float32."""
    return G.to(torch.float64 if reference.dtype == torch.float64 else torch.float32)


HANDLERS = {nn.Linear: LinearHandler, nn.Conv2d: Conv2dHandler,
            nn.Embedding: EmbeddingHandler}
