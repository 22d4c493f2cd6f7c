"""Opt-in torch.func fallback for a module the capture does not know: its own (direct)
trainable parameters get materialized per-sample gradients,

    g_i = ∇_θ ⟨f(θ, x_i), e_i⟩     (vmap over the samples of grad of the output·grad product),

with x_i the i-th sample of every positional tensor argument (dim 0; other arguments and
keyword arguments are passed whole) and e_i the captured gradient of its output(s). Right for
modules that treat samples independently; costs B copies of those parameters, so meant for
small modules. The module is re-run under the autocast state of its forward call (so a
bf16 autocast forward is replayed as bf16 autocast, not with mixed dtypes)."""
import contextlib

import torch

from ._kinds import DenseFactors


class FallbackHandler:
    def __init__(self, name, module, params, capture):
        self.name, self.module, self.params, self.capture = name, module, params, capture

    def save(self, args, kwargs):
        autocast = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")
                    if torch.is_autocast_enabled(d)]
        return (tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), kwargs,
                autocast)

    def contributions(self, saved, grads, backend):
        (args, kwargs, autocast), B = saved, grads_batch_size(grads)
        grads = tuple(grads)
        in_dims = tuple(0 if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == B
                        else None for a in args)
        module = self.module
        names = list(self.params)

        def sample_product(values, sample_args, sample_grads):
            call_args = [a[None] if d == 0 else a for a, d in zip(sample_args, in_dims)]
            outputs = torch.func.functional_call(module, dict(zip(names, values)),
                                                 tuple(call_args), kwargs)
            outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
            return sum((o[0] * g).sum() for o, g in zip(outputs, sample_grads) if g is not None)

        values = tuple(self.params[n].detach() for n in names)
        grad_in_dims = tuple(None if g is None else 0 for g in grads)
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.capture.paused())
            for device, dtype in autocast:
                stack.enter_context(torch.autocast(device, dtype=dtype))
            per_sample = torch.func.vmap(torch.func.grad(sample_product),
                                         in_dims=(None, in_dims, grad_in_dims))(values, args, grads)
        dtype = torch.float64 if values[0].dtype == torch.float64 else torch.float32
        return [(self.params[n], DenseFactors(G.to(dtype))) for n, G in zip(names, per_sample)]


def grads_batch_size(grads):
    return next(g.shape[0] for g in grads if g is not None)
