"""The weighted backward (`Capture.weighted`): the backward of the loss itself leaves

    p.grad = U_p w·s = Σ_i c_i g_i      (w_i = c_i / s, loss = s·Σ_i ℓ_i, g_i as Capture's)

in every captured parameter, in the cost of a plain backward. In a forward inside the
context, a captured layer call whose backward node is known runs on that node, with hooks
or as one C++ node (`_weighted_hooks`: a Linear / Conv1D / Conv2d on a sample-major input,
an Embedding, a norm whose graph is the one native node); any other runs its own forward
inside one autograd Function (the same values; the layer's own graph for its input, built
inside). Either way the backward gives

    the input:      the normal input gradient, through the layer's own graph (unscaled — the
                    chain to the layers before, train-mode batch statistics included, is
                    the plain backward's);
    the parameters: the layer's weight-gradient computation on the output gradient e with
                    row i scaled by w_i — the same GEMM / convolution / scatter the plain
                    backward runs (which is Σ_i s·g_i), instead of it, not besides it (a
                    Conv2d: one convolution_backward for both, x's rows scaled instead of
                    e's).

Exact for every layer kind whose per-sample gradients are linear in the row of e (all of
Capture's: Linear, Conv1D, Conv2d incl. groups, Embedding, the norms' affine parameters
in train or eval mode, where g_i is sample i's share as Capture defines it). A parameter
used directly in a container's forward (see _direct) gets its rows scaled at its use. A
call the weighting cannot take (the torch.func fallback, a module not yet recognized, an
output that is not one tensor) runs as usual and is recorded by the capture: its
contribution to .grad is then the plain s·U_call 1 (`Capture.recorded()` tells).
"""
import contextlib
import typing

import torch

from . import _weighted_hooks as _hooks
from ._generic import AffineHandler, Conv1DHandler
from ._layers import Conv2dHandler, EmbeddingHandler, LinearHandler
from ._norms import _AffineNormHandler


class Weighting:
    """The forward patches of one `Capture.weighted(weights)` block (see the module doc)."""

    def __init__(self, capture, weights):
        self.capture, self.weights = capture, weights
        self._cache = {}  # B -> {id(param): w (B,)}, as weights(B) gave it (not modified)
        self._ones = {}  # (B, id(param)) -> ones (B,), for a parameter weights(B) gives none
        self._shaped = {}  # (id(w), dims, dtype) -> w shaped over a tensor's rows
        self._patched = []  # (module, the instance forward it had or None)
        self._bypass = False

    def rows(self, p, B):
        """w (B,) for parameter p in a batch of B (ones where weights gave none: the plain
        gradient)."""
        weights = self._cache.get(B)
        if weights is None:
            weights = self._cache[B] = self.weights(B)
        w = weights.get(id(p))
        if w is None:
            w = self._ones.get((B, id(p)))
            if w is None:
                w = self._ones[B, id(p)] = torch.ones(B, dtype=p.dtype, device=p.device)
        return w

    def shaped(self, w, t):
        """w (B,) shaped to broadcast over the rows of t, in t's dtype and device."""
        key = (id(w), t.dim(), t.dtype)
        out = self._shaped.get(key)
        if out is None:
            out = self._shaped[key] = w.to(device=t.device, dtype=t.dtype).reshape(
                -1, *([1] * (t.dim() - 1)))
        return out

    def __enter__(self):
        capture = self.capture
        if capture._weighted_forwards is None:  # [(module, handler, [instance forward, ours])]
            capture._weighted_forwards = [(m, h, [None, None]) for m, h, _ in capture._handlers
                                          if _supported(h)]
        for module, handler, entry in capture._weighted_forwards:
            had = module.__dict__.get("forward")
            if entry[1] is None or entry[0] is not had:  # built once per module and forward
                entry[:] = had, _weighted_forward(capture, module, handler, module.forward)
            module.__dict__["forward"] = entry[1]
            self._patched.append((module, had))
        return self

    def __exit__(self, *exc):
        for module, had in self._patched:
            if had is None:
                del module.__dict__["forward"]
            else:
                module.__dict__["forward"] = had
        self._patched = []
        return False

    def _hooked(self, module, y, hooked):
        """y of a call on the plain node; recorded by the capture where not hooked."""
        if hooked:
            self.capture._skip_record = module
        return y

    def save(self, handler, x, rest, kwargs, y):
        """What the handler keeps of a call (an affine module's x̂: the capture paused)."""
        if not isinstance(handler, AffineHandler):
            return handler.save((x, *rest), y)
        with self.capture.paused(), self.bypassed():
            return handler.save((x, *rest), kwargs, y)

    @contextlib.contextmanager
    def bypassed(self):
        bypass, self._bypass = self._bypass, True
        try:
            yield
        finally:
            self._bypass = bypass

    def scale_direct(self, handler, q_b):
        """A direct use of parameter p as q_b (B rows): its rows of the gradient scaled."""
        if q_b.requires_grad:
            w = self.rows(handler.param, q_b.shape[0])
            q_b.register_hook(lambda G: G * self.shaped(w, G))


def _weighted_forward(capture, module, handler, original):
    """module's forward inside the capture's weighted blocks (patched in by each block's
    Weighting, which it reads from the capture at each call): the layer call on its node,
    hooked or as one C++ node where that is known (_weighted_hooks), else through _Layer."""
    plan = _Plan(handler, original)
    params = plan.params

    def forward(*args, **kwargs):
        weighting = capture._weighting
        x = args[0] if args else None
        if (weighting is None or weighting._bypass or not isinstance(x, torch.Tensor)
                or not torch.is_grad_enabled() or capture._kind_of(module) != "native"
                or ((len(args) > 1 or kwargs) and _other_grads(args, kwargs))
                or torch._C._functorch.peek_interpreter_stack() is not None):
            return original(*args, **kwargs)  # recorded by the capture's hook, if at all
        B = capture._forward_batch
        if B is not None and B > 1 and x.dim() > 0 and x.shape[0] == 1:
            x = x.expand(B, *x.shape[1:])  # a call broadcast over the batch: B rows
        elif plan.linear_node and x.dim() >= 2 and not kwargs and len(args) == 1 and \
                _hooks.swappable(x):
            return weighting._hooked(module, _hooks.weighted_linear(plan, weighting, x), True)
        elif plan.conv_node and x.dim() == 4 and not kwargs and len(args) == 1 and \
                _hooks.swappable(x):
            return weighting._hooked(module, _hooks.weighted_conv2d(plan, weighting, x), True)
        elif plan.swap and _hooks.swappable(x):
            return weighting._hooked(module,
                                     *_hooks.swapped_call(plan, weighting, args, kwargs))
        elif plan.embedding and x.dim() > 0:
            return weighting._hooked(module,
                                     *_hooks.scaled_embedding(plan, weighting, args, kwargs))
        elif plan.norm and id(module) in capture._native_norms:
            y, hooked = _hooks.hooked_norm(plan, weighting, _NativeNorm.of, args, kwargs)
            if not hooked:
                capture._native_norms.discard(id(module))
            return weighting._hooked(module, y, hooked)
        call = _Call(weighting, plan, args[1:], kwargs)
        y = _Layer.apply(call, x, *params)
        if call.norm is not None:  # its graph is the one native node: hooked from now
            capture._native_norms.add(id(module))
        capture._skip_record = module
        return y

    return forward


def _supported(handler):
    return (isinstance(handler, (LinearHandler, Conv1DHandler, Conv2dHandler, EmbeddingHandler,
                                 _AffineNormHandler, AffineHandler))
            and not getattr(handler.module, "sparse", False))


def _other_grads(args, kwargs):
    """Whether an argument besides the input carries a gradient (not passed through)."""
    return any(isinstance(a, torch.Tensor) and a.requires_grad
               for a in (*args[1:], *kwargs.values()))


class _Plan:
    """A captured module's static part of its weighted calls (made once per block): its
    parameters in order, how its input gradient is formed and which backward it takes."""
    __slots__ = ("bias", "conv", "conv_node", "direct", "embedding", "handler", "linear",
                 "linear_node", "names", "norm", "original", "params", "swap", "transposed",
                 "weight")

    def __init__(self, handler, original):
        self.handler, self.original = handler, original
        self.names, self.params = tuple(handler.params), tuple(handler.params.values())
        self.weight, self.bias = handler.params.get("weight"), handler.params.get("bias")
        self.direct = _direct_input_grad(handler)
        self.linear = isinstance(handler, (LinearHandler, Conv1DHandler))
        self.transposed = isinstance(handler, Conv1DHandler)
        self.conv = isinstance(handler, Conv2dHandler)
        self.norm = isinstance(handler, _AffineNormHandler)
        self.swap = self.linear or (self.conv and self.direct)  # see _weighted_hooks
        native = _hooks.NATIVE is not None and self.weight is not None  # the C++ nodes
        self.linear_node = native and self.linear
        self.conv_node = native and self.conv and self.direct
        self.embedding = (isinstance(handler, EmbeddingHandler)
                          and not handler.module.scale_grad_by_freq)


class _Call:
    """One layer call's non-tensor state (what the Function's forward and backward share)."""
    __slots__ = ("inner", "kwargs", "norm", "plan", "rest", "saved", "weighting", "y")

    def __init__(self, weighting, plan, rest, kwargs):
        self.weighting, self.plan, self.rest, self.kwargs = weighting, plan, rest, kwargs
        self.saved = self.inner = self.y = self.norm = None


class _Layer(torch.autograd.Function):
    """y = layer(x) (the layer's own forward); backward: the input gradient as the plain
    backward's (the layer's input-gradient GEMM / convolution, or its own graph, built
    inside, for the norms), the parameter gradients from the output gradient's rows scaled."""

    @staticmethod
    def forward(ctx, call, x, *params):
        plan = call.plan
        handler = plan.handler
        graph = x.requires_grad and not plan.direct
        inner = x.detach()
        if graph:
            inner.requires_grad_()
            with torch.enable_grad():
                y = plan.original(inner, *call.rest, **call.kwargs)
        else:
            y = plan.original(inner, *call.rest, **call.kwargs)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"capture: module '{handler.name}' returned {type(y).__name__}, "
                            "expected a tensor")
        if graph and plan.norm:
            call.norm = _NativeNorm.of(y)
        if call.norm is None:
            call.saved = call.weighting.save(handler, inner.detach() if graph else inner,
                                             call.rest, call.kwargs, y.detach() if graph else y)
            if graph and y.requires_grad:
                call.inner, call.y = inner, y
        ctx.call = call
        return y.detach() if graph else y

    @staticmethod
    def backward(ctx, g):
        call = ctx.call
        plan = call.plan
        need_input = ctx.needs_input_grad[1]
        if plan.linear:
            return (None, *_linear(plan, call.saved, g, call.weighting, ctx.needs_input_grad))
        gx = None
        if call.norm is not None:
            gx, grads = call.norm.backward(g, call, need_input)
            call.norm = None
        elif plan.conv and call.inner is None:
            gx, grads = _conv2d(plan.handler, call.saved, g, call.weighting, need_input)
        else:
            if call.inner is not None:
                gx, = torch.autograd.grad(call.y, call.inner, g, allow_unused=True)
                call.inner = call.y = None
            grads = _parameter_grads(plan.handler, call.saved, g, call.weighting)
        return (None, gx, *(grads.get(id(p)) if need else None
                            for p, need in zip(plan.params, ctx.needs_input_grad[2:])))


class _NativeNorm:
    """A BatchNorm / GroupNorm / LayerNorm call whose graph is the one native node: its
    saved tensors (the batch statistics) taken, the node's own backward called for the input
    with e; the affine parameters' gradients Σ_i w_i (Σ g_i x̂_i, Σ g_i) from the per-sample,
    per-channel sums of one more read of e and x (batch and group norm), or from the node's
    backward on e's rows scaled (layer norm: its parameters span the last dims)."""

    NODES: typing.ClassVar = {"NativeBatchNormBackward0": ("running_mean", "running_var", "result1", "result2",
                                          "training", "eps"),
             "NativeGroupNormBackward0": ("result1", "result2", "N", "C", "HxW", "group"),
             "NativeLayerNormBackward0": ("normalized_shape", "result1", "result2")}

    def __init__(self, kind, node):
        self.kind = kind
        self.input, self.weight = node._saved_input, node._saved_weight
        # detached: the statistics are the node's own outputs, each unpacked with the node as
        # its grad_fn; kept so by the node's hook, they would close a cycle through C++ that
        # no garbage collection frees
        self.args = [_detached(getattr(node, "_saved_" + a)) for a in self.NODES[kind]]
        self.bias = node._saved_bias if kind == "NativeLayerNormBackward0" else None

    @classmethod
    def of(cls, y):
        node = y.grad_fn
        kind = type(node).__name__
        return cls(kind, node) if kind in cls.NODES and node._saved_weight is not None else None

    def _call(self, g, mask):
        x, W, a = self.input, self.weight, self.args
        if self.kind == "NativeBatchNormBackward0":
            return torch.ops.aten.native_batch_norm_backward(g, x, W, *a, mask)
        if self.kind == "NativeGroupNormBackward0":
            return torch.ops.aten.native_group_norm_backward(g, x, a[0], a[1], W, *a[2:], mask)
        return torch.ops.aten.native_layer_norm_backward(g, x, a[0], a[1], a[2], W, self.bias,
                                                         mask)

    def backward(self, g, call, need_input):
        gx = self._call(g, [True, False, False])[0] if need_input else None
        return gx, self.affine(g, call.plan.handler.params, call.weighting)

    def affine(self, g, params, weighting):
        """{id(p): Σ_i w_i ∂p_i} of the affine parameters, from the output gradient g."""
        B = g.shape[0]
        w = {n: weighting.rows(p, B) for n, p in params.items()}
        stats = self._channel_statistics()
        if stats is not None:
            sums = _affine_sums(g, self.input, *stats, w.get("weight"), w.get("bias"))
            return {id(p): _as(sums[n], p.dtype) for n, p in params.items()}
        if self.kind == "NativeLayerNormBackward0" and _layer_norm_kernel(g, self.input,
                                                                            self.args[1]):
            sums = _layer_norm_sums(g, self.input, self.args[1], self.args[2], w)
            return {id(p): _as(sums[n].view(p.shape), p.dtype) for n, p in params.items()}
        out = {}
        names = list(params)
        groups = [names] if len({id(w[n]) for n in names}) == 1 else [[n] for n in names]
        for group in groups:
            gs = g * weighting.shaped(w[group[0]], g)
            _, gw, gb = self._call(gs, [False, "weight" in group, "bias" in group])
            for n, t in (("weight", gw), ("bias", gb)):
                if n in group:
                    out[id(params[n])] = _as(t, params[n].dtype)
        return out

    def _channel_statistics(self):
        """(mean, 1/σ) that a batch or group norm's forward normalized with, (1, C) (the
        batch's, or the running ones in eval mode) or (B, groups); None for a layer norm."""
        a = self.args
        if self.kind == "NativeBatchNormBackward0":
            running_mean, running_var, mean, invstd, training, eps = a
            if not training:
                mean, invstd = running_mean, (running_var + eps).rsqrt()
            return mean.view(1, -1), invstd.view(1, -1)
        if self.kind == "NativeGroupNormBackward0":
            return a[0], a[1]
        return None


def _detached(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


def _affine_sums(g, x, mean, invstd, w, wb):
    """{"weight": Σ_i w_i Σ_hw g_i x̂_i, "bias": Σ_i wb_i Σ_hw g_i} per channel (C,), in one read
    of g and x (x̂ = (x − mean) / σ, with the statistics given as (1 or B, G), G | C; w or wb
    None: that sum not needed): the capture's C++ kernel on CPU, else the batch-norm
    backward of the batch viewed as one sample of B·C channels with each (sample, channel)'s
    statistics, weighted over the samples."""
    B, C = x.shape[:2]
    mean, invstd, g = _as(mean, x.dtype), _as(invstd, x.dtype), _as(g, x.dtype)
    if _hooks.NATIVE is not None and x.device.type == "cpu" and \
            x.dtype in (torch.float32, torch.float64):
        a = w if w is not None else wb
        gw, gb = _hooks.NATIVE.capture_norm_affine_sums(g, x, mean, invstd, a,
                                                         wb if wb is not None else a)
        return {"weight": gw, "bias": gb}
    mean, invstd = (s.repeat_interleave(C // s.shape[1], 1).expand(B, C).reshape(-1)
                    for s in (mean, invstd))
    _, gw, gb = torch.ops.aten.native_batch_norm_backward(
        g.reshape(1, B * C, -1), x.reshape(1, B * C, -1), None, None, None, mean, invstd,
        True, 0.0, [False, w is not None, wb is not None])
    return {n: _as(c, x.dtype) @ t.view(B, C) for n, c, t in (("weight", w, gw), ("bias", wb, gb))
            if c is not None}


def _layer_norm_kernel(g, x, mean):
    """Whether the capture's C++ layer-norm sums take these tensors (CPU, one float dtype)."""
    return (_hooks.NATIVE is not None and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and g.dtype == x.dtype and mean.dtype == x.dtype)


def _layer_norm_sums(g, x, mean, rstd, w):
    """{"weight": Σ_i w_i Σ_t g_it ⊙ x̂_it, "bias": Σ_i w_i Σ_t g_it} of a layer norm over
    its last D = x.numel() / mean.numel() values (x̂ = (x − mean) · rstd, rows sample-major),
    in one read of g and x (lowrank_kernels._C.capture_layer_norm_affine_sums)."""
    R = mean.numel()
    a = w.get("weight", w.get("bias")).to(x.dtype)
    b = w.get("bias", a).to(x.dtype)
    gw, gb = _hooks.NATIVE.capture_layer_norm_affine_sums(
        g.reshape(R, -1), x.reshape(R, -1), mean.reshape(R), rstd.reshape(R), a, b)
    return {"weight": gw, "bias": gb}


def _direct_input_grad(handler):
    """Whether `_input_grad` gives the layer's input gradient (else: its own graph)."""
    if isinstance(handler, (LinearHandler, Conv1DHandler, EmbeddingHandler)):
        return True
    m = handler.module
    return (isinstance(handler, Conv2dHandler) and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


def _parameter_grads(handler, saved, g, weighting):
    """{id(p): Σ_i w_i · (row i's part of the plain weight gradient)} for one call of an
    embedding or a norm (whose graph is not the one native node)."""
    B = g.shape[0]
    params = handler.params
    w = {n: weighting.rows(p, B) for n, p in params.items()}
    if isinstance(handler, EmbeddingHandler):
        return _embedding(handler.module, params, w, saved, g, weighting)
    out = {}  # norms: the per-sample affine gradients (B × channels) weighted
    for p, part in handler.contributions(saved, g, None):
        n = next(k for k, q in params.items() if q is p)
        out[id(p)] = part.weighted_sum(w[n].to(part.G.dtype)).to(p.dtype)
    return out


def _linear(plan, x, g, weighting, needs):
    """(gx, *parameter gradients) of a Linear (y = x Wᵀ + b) or Conv1D (y = x W + b) call:

        gx = g W (Linear) or g Wᵀ (Conv1D), the plain input gradient;
        W: (g ⊙ w)ᵀ x over all rows and tokens (the scaling on the narrower side; Conv1D's
           as xᵀ (g ⊙ w), in W's own layout);
        b: Σ_i w_i Σ_t g_it.
    needs: the Function's needs_input_grad (call, x, *parameters)."""
    W = plan.handler.module.weight
    d_in, d_out = x.shape[-1], g.shape[-1]
    if x.dtype != g.dtype:
        dtype = torch.promote_types(x.dtype, g.dtype)
        x, g = x.to(dtype), g.to(dtype)
    gx = None
    if needs[1]:
        Wg = _as(W.detach(), g.dtype)
        gx = g @ (Wg.T if plan.transposed else Wg)
    out = [gx]
    B = g.shape[0]
    for name, p, need in zip(plan.names, plan.params, needs[2:]):
        if not need:
            out.append(None)
            continue
        w = weighting.rows(p, B)
        if name == "weight":
            rows = weighting.shaped(w, g)
            if d_out <= d_in:
                gs, xs = _flat(g * rows), _flat(x)
            else:
                gs, xs = _flat(g), _flat(x * rows)
            out.append(_as(xs.T @ gs if plan.transposed else gs.T @ xs, p.dtype))
        else:
            out.append(_as(_hooks.weighted_bias(g, w, B, False), p.dtype))
    return out


def _flat(t):
    """(rows, features) of t (B, …, features)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _as(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)


def _conv2d(handler, saved, g, weighting, need_input):
    """(input gradient, {id(p): weighted gradient}) of one Conv2d call in one native call:

        convolution_backward(e, x ⊙ w, W) -> (the plain input gradient, Σ_i w_i ∂W(e_i, x_i))

    (the weight gradient is linear in each sample's input row and the input gradient does
    not read x, so x's rows are scaled, not e's); the bias: Σ_i w_i Σ_hw e_i."""
    x, (_, stride, padding, dilation, groups) = saved
    params = handler.params
    if x.dtype != g.dtype:
        dtype = torch.promote_types(x.dtype, g.dtype)
        x, g = x.to(dtype), g.to(dtype)
    W, b = params.get("weight"), params.get("bias")
    out = {}
    if W is not None or need_input:
        weight = W if W is not None else handler.module.weight
        if W is not None:
            x = x * weighting.shaped(weighting.rows(W, g.shape[0]), x)
        gx, gW, _ = torch.ops.aten.convolution_backward(
            g, x, _as(weight.detach(), g.dtype), None, list(stride), list(padding),
            list(dilation), False, [0, 0], groups, [need_input, W is not None, False])
        if W is not None:
            out[id(W)] = _as(gW, W.dtype)
    else:
        gx = None
    if b is not None:
        w = weighting.rows(b, g.shape[0])
        out[id(b)] = _as(_hooks.weighted_bias(g, w, g.shape[0], True), b.dtype)
    return gx, out


def _embedding(module, params, w, idx, g, weighting):
    """The table's gradient (a scatter of e's rows, scaled by w_i; padding rows excluded)."""
    p = params["weight"]
    gs = g * weighting.shaped(w["weight"], g)
    padding = -1 if module.padding_idx is None else module.padding_idx
    grad = torch.ops.aten.embedding_dense_backward(gs.reshape(-1, gs.shape[-1]),
                                                   idx.reshape(-1), p.shape[0], padding, False)
    return {id(p): _as(grad, p.dtype)}

