"""Handlers for layers that third-party model libraries spell their own way, recognized by
what they compute (checked on their first call), not by their class:

  Conv1DHandler            transformers' Conv1D: y = x W + b with W (d_in × d_out), a Linear
                           with its weight transposed (factored per-sample gradients)
  AffineHandler            any leaf module with a per-channel scale and/or shift whose output is
                           y = x̂ ⊙ w + b, x̂ = the module's output with w = 1, b = 0 (RMSNorm and
                           LayerNorm variants however spelled — LlamaRMSNorm, T5LayerNorm, timm
                           LayerNorm / LayerNorm2d over channels — and layer-scale modules);
                           G_w[i] = Σ x̂_i ⊙ e_i, G_b[i] = Σ e_i over all but the channel dim
  BatchNormSubclassHandler a BatchNorm subclass with its own forward that keeps the base math
                           and adds a drop / act after it (timm BatchNormAct2d): the base
                           BatchNorm's per-sample gradients with e taken before the activation

The first call of each module checks that its output equals the recomputed one (to the
dtype's rounding); a module that computes something else raises `NotRecognized`, and the
capture then reports it (or hands it to the torch.func fallback).
"""
import torch
import torch.nn.functional as F
from torch import nn

from ._kinds import DenseFactors, LinearFactors
from ._norms import BatchNormHandler

_SCALES = ("weight", "gamma", "scale", "g")
_SHIFTS = ("bias", "beta", "shift", "b")


class NotRecognized(Exception):
    """The module's first call does not match the math its handler assumed."""


def _float_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _tolerance(dtype):
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 2e-2)


def _same(predicted, output, what):
    if not isinstance(output, torch.Tensor) or predicted.shape != output.shape:
        raise NotRecognized(f"{what}: output of shape "
                            f"{getattr(output, 'shape', type(output).__name__)}")
    ref, out = predicted.double(), output.detach().double()
    scale = max(float(ref.abs().max()) if ref.numel() else 0.0, 1e-30)
    error = float((ref - out).abs().max()) / scale if ref.numel() else 0.0
    if not error <= _tolerance(output.dtype):
        raise NotRecognized(f"{what} (relative difference {error:.2g})")


def _reduce(Y, channel_dim):
    """Σ over every dim but the batch (0) and channel_dim: (B, C)."""
    Y = Y.movedim(channel_dim, -1)
    return Y.reshape(Y.shape[0], -1, Y.shape[-1]).sum(1)


def is_conv1d(module, params):
    """transformers' Conv1D (weight (nx, nf), bias (nf,)), by its structure."""
    w = params.get("weight")
    return (type(module).__name__ == "Conv1D" and w is not None and w.dim() == 2
            and getattr(module, "nf", None) == w.shape[1] and set(params) <= {"weight", "bias"})


class Conv1DHandler:
    """y = x W + b, W (d_in × d_out): weight g_i = (Σ_t e_it a_itᵀ)ᵀ, bias g_i = Σ_t e_it."""

    def __init__(self, name, module, params):
        self.name, self.module, self.params = name, module, params

    def verify(self, args, kwargs, output):
        m = self.module
        x = args[0]
        y = x @ m.weight.to(x.dtype)
        if m.bias is not None:
            y = y + m.bias.to(x.dtype)
        _same(y, output, f"module '{self.name}' ({type(m).__name__}) is not y = x W + b")

    def save(self, args, output):
        x = args[0]
        if x.dim() < 2:
            raise ValueError(f"capture: module '{self.name}' got an input of shape "
                             f"{tuple(x.shape)}; the capture needs a leading batch dim")
        return x.detach()

    def contributions(self, x, E, backend):
        B, d_out = x.shape[0], E.shape[-1]
        E = E.reshape(B, -1, d_out)
        out = []
        if "weight" in self.params:
            A = x.reshape(B, -1, x.shape[-1])
            out.append((self.params["weight"], LinearFactors(A, E, backend, transposed=True)))
        if "bias" in self.params:
            dtype = _float_dtype(E)
            out.append((self.params["bias"], DenseFactors(E.sum(1).to(dtype))))
        return out


def affine_roles(module, params):
    """(scale name or None, shift name or None) when `module` is a leaf whose trainable
    parameters are one per-channel scale and/or shift (1-D, one size), else None."""
    if not params or len(params) > 2 or any(True for _ in module.children()):
        return None
    if len({tuple(p.shape) for p in params.values()}) != 1 or next(
            iter(params.values())).dim() != 1:
        return None
    scale = [n for n in params if n in _SCALES]
    shift = [n for n in params if n in _SHIFTS]
    if len(scale) > 1 or len(shift) > 1 or len(scale) + len(shift) != len(params):
        return None
    return (scale[0] if scale else None), (shift[0] if shift else None)


class AffineHandler:
    """y = x̂ ⊙ w + b per channel, x̂ = the module with w = 1 and b = 0 (checked)."""

    def __init__(self, name, module, params, roles):
        self.name, self.module, self.params = name, module, params
        self.scale, self.shift = roles
        self.channel_dim = None  # found on the first call: -1 (trailing) or 1

    def _normalized(self, args, kwargs):
        values = {}
        for n, p in self.params.items():
            values[n] = (torch.ones_like(p) if n == self.scale else torch.zeros_like(p))
        with torch.no_grad():
            return torch.func.functional_call(self.module, values, args, kwargs)

    def _predict(self, xhat, channel_dim, values=None):
        values = values or {n: p.detach() for n, p in self.params.items()}
        shape = [1] * xhat.dim()
        shape[channel_dim] = -1
        y = xhat
        if self.scale is not None:
            y = y * values[self.scale].reshape(shape).to(y.dtype)
        if self.shift is not None:
            y = y + values[self.shift].reshape(shape).to(y.dtype)
        return y

    def verify(self, args, kwargs, output):
        """The channel dim from a probe with distinct per-channel values (at initialization
        w = 1 makes every layout look right), then the output checked against x̂ ⊙ w + b."""
        what = (f"module '{self.name}' ({type(self.module).__name__}) is not a per-channel "
                "y = x̂ ⊙ w + b")
        if not isinstance(output, torch.Tensor) or output.dim() < 2:
            raise NotRecognized(what)
        xhat = self._normalized(args, kwargs)
        C = next(iter(self.params.values())).shape[0]
        probe = {n: torch.linspace(0.5, 1.5, C, dtype=p.dtype, device=p.device) * (
            1 if n == self.scale else 0.3) for n, p in self.params.items()}
        with torch.no_grad():
            probed = torch.func.functional_call(self.module, probe, args, kwargs)
        for dim in (1, -1):
            if output.shape[dim] != C:
                continue
            try:
                _same(self._predict(xhat, dim, probe), probed, what)
            except NotRecognized:
                continue
            _same(self._predict(xhat, dim), output, what)
            self.channel_dim = dim
            return
        raise NotRecognized(what)

    def save(self, args, kwargs, output):
        return self._normalized(args, kwargs)

    def contributions(self, xhat, E, backend):
        dtype = _float_dtype(E)
        E = E.to(dtype)
        out = []
        if self.scale is not None:
            G = _reduce(xhat.to(dtype) * E, self.channel_dim)
            out.append((self.params[self.scale], DenseFactors(G)))
        if self.shift is not None:
            out.append((self.params[self.shift], DenseFactors(_reduce(E, self.channel_dim))))
        return out


def is_batchnorm_subclass(module):
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


class BatchNormSubclassHandler(BatchNormHandler):
    """A BatchNorm subclass with its own forward: y = act(drop(BN(x))) with the base
    BatchNorm's math and the module's own `drop` / `act` children when it has them (timm
    BatchNormAct2d); the output gradient is taken back through them to BN's output."""

    def _post(self):
        m = self.module
        post = [getattr(m, n) for n in ("drop", "act") if isinstance(getattr(m, n, None),
                                                                     nn.Module)]
        return post

    def _apply(self, x, state):
        m = self.module
        if state is None:
            z = F.batch_norm(x, None, None, m.weight, m.bias, training=True, eps=m.eps)
        else:
            mean, var = state
            z = F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), m.weight, m.bias,
                             training=False, eps=m.eps)
        y = z.clone()  # an in-place activation must not overwrite z
        for f in self._post():
            y = f(y)
        return z, y

    def verify(self, args, kwargs, output):
        with torch.no_grad():
            _, y = self._apply(args[0].detach(), self.state())
        _same(y, output, f"module '{self.name}' ({type(self.module).__name__}) is not "
                         "act(drop(BatchNorm(x)))")

    def contributions(self, saved, E, backend):
        x, state = saved
        if self._post():
            with torch.enable_grad():
                z, y = self._apply(x, state)
                E = torch.autograd.grad(y, z, E.to(y.dtype))[0]
        return super().contributions(saved, E, backend)
