"""Weighted layer calls on the layer's own forward and its own backward node (the contract
is `_weighted`'s), for the calls whose node is known: nothing of ours runs in the forward
but hooks (or the one C++ node), and the backward is the plain backward's but for

    Linear / Conv1D with a trainable weight: one C++ node (weighted_linear: the layer's
        forward; backward gx = g W, gW = gᵀ (x ⊙ w), gb = Σ_i w_i Σ_t g_it, no Python);
    Conv2d with a trainable weight and zero padding: one C++ node (weighted_conv2d: the
        layer's forward; backward one convolution_backward of (g, x ⊙ w), gb as above);
    another Linear / Conv1D / Conv2d call (a frozen weight, more arguments): the input x
        that the node saves for its weight gradient (and for nothing else: the input
        gradient reads W) is handed back to the node as x ⊙ w, rows scaled (saved-tensor
        hooks around the call), so that the node's own GEMM / convolution gives
        Σ_i w_i ∂W_i; a trainable bias's gradient is replaced by Σ_i w_i Σ_t e_it (a
        post-hook on the node that sums the bias);
    Embedding: the output gradient's rows scaled by w before the node's own scatter (a
        pre-hook; the node's one gradient is the table's), which then gives Σ_i w_i ∂W_i;
    BatchNorm / GroupNorm / LayerNorm whose forward is the one native node: the node's
        affine-parameter gradients are replaced by their weighted sums (a post-hook, in
        C++ on CPU: lowrank_kernels._C.capture_hook_norm_affine).

A call whose node is not as expected is undone to the plain backward (its output comes
back with False; the caller lets the capture record it), so the result is exact either way."""
import torch

from .. import _capabilities as caps

NATIVE = caps._native_import()[0]  # lowrank_kernels._C (its capture_* nodes), None unbuilt
_VIEWS = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0")


class _Scaled:
    """What the pack hook keeps of the saved x: x, its version then, and w (B,) — or None
    once the call is undone (the plain x is handed back)."""
    __slots__ = ("name", "t", "version", "w")

    def __init__(self, t, w, name):
        self.t, self.version, self.w, self.name = t, t._version, w, name


def _unpack(saved):
    if type(saved) is not _Scaled:
        return saved
    t, w = saved.t, saved.w
    if t._version != saved.version:
        raise RuntimeError(f"capture.weighted: the input of module '{saved.name}' was "
                           "modified in place after the layer used it (its weight gradient "
                           "reads it)")
    if w is None:
        return t
    B = w.shape[0]
    if w.dtype != t.dtype:
        w = w.to(t.dtype)
    if t.shape[0] == B:
        return t * w.view(B, *([1] * (t.dim() - 1)))
    return (t.view(B, -1) * w[:, None]).view(t.shape)  # (B·T, d) rows, sample-major


def swappable(x):
    """Whether a call on x can take the saved-tensor path: x sample-major in memory, no
    autocast (which would save a cast copy), no saved-tensor hooks of the user's."""
    return ((x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
            and not torch.is_autocast_enabled(x.device.type)
            and torch._C._autograd._top_saved_tensors_default_hooks(False) is None)


def weighted_linear(plan, weighting, x):
    """y of a Linear / Conv1D call on x (B, ..., d_in) as one node whose backward gives
    Σ_i w_i ∂W_i, Σ_i w_i ∂b_i and the plain input gradient (a frozen bias: in the forward
    only); lowrank_kernels._C.capture_weighted_linear."""
    m = plan.handler.module
    return NATIVE.capture_weighted_linear(x, m.weight, m.bias, *_node_weights(plan, weighting, x),
                                          plan.transposed)


def weighted_conv2d(plan, weighting, x):
    """y of a Conv2d call (zero padding given as numbers) on x (B, C_in, H, W) as one node
    whose backward gives Σ_i w_i ∂W_i, Σ_i w_i ∂b_i and the plain input gradient (a frozen
    bias: in the forward only); lowrank_kernels._C.capture_weighted_conv2d."""
    m = plan.handler.module
    return NATIVE.capture_weighted_conv2d(x, m.weight, m.bias, *_node_weights(plan, weighting, x),
                                          m.stride, m.padding, m.dilation, m.groups)


def _node_weights(plan, weighting, x):
    """(w, wb) of a C++ node's call on x: the weight's rows, the bias's (the weight's for a
    frozen bias, which the node then leaves without a gradient)."""
    w = weighting.rows(plan.weight, x.shape[0])
    return w, (w if plan.bias is None else weighting.rows(plan.bias, x.shape[0]))


def swapped_call(plan, weighting, args, kwargs):
    """(y, True) for a Linear / Conv1D / Conv2d call whose backward gives the weighted
    gradients, or (y, False) when its node did not look as expected (then it is plain)."""
    x = args[0]
    B = x.shape[0]
    name = plan.handler.name
    scaled = None
    if plan.weight is not None:
        w = weighting.rows(plan.weight, B)
        ptr, numel, dtype = x.data_ptr(), x.numel(), x.dtype

        def pack(t):  # x itself or a view of all of it (the same first element and size)
            nonlocal scaled
            if (scaled is None and t.data_ptr() == ptr and t.numel() == numel
                    and t.dtype == dtype and (t.shape[0] == B or t.is_contiguous())):
                scaled = _Scaled(t, w, name)
                return scaled
            return t

        torch._C._autograd._push_saved_tensors_default_hooks(pack, _unpack)
        try:
            y = plan.original(*args, **kwargs)
        finally:
            torch._C._autograd._pop_saved_tensors_default_hooks()
        if scaled is None:
            return y, False
    else:
        y = plan.original(*args, **kwargs)
    if plan.bias is not None and not _hook_bias(y, plan, weighting, B):
        if scaled is not None:
            scaled.w = None
        return y, False
    return y, True


def _hook_bias(y, plan, weighting, B):
    """Puts the weighted-bias post-hook on the node of y's graph that sums the bias: the
    node (y's, or below up to two views) with the bias's AccumulateGrad among its next
    functions."""
    bias = plan.bias
    node = y.grad_fn
    for _ in range(3):
        if node is None:
            return False
        edges = node.next_functions
        for k, (n, _) in enumerate(edges):
            if n is not None and getattr(n, "variable", None) is bias:
                w = weighting.rows(bias, B)

                def post(grad_inputs, grad_outputs, k=k):
                    g = grad_outputs[0]
                    out = list(grad_inputs)
                    out[k] = weighted_bias(g, w, B, plan.conv)
                    if out[k].dtype != bias.dtype:
                        out[k] = out[k].to(bias.dtype)
                    return tuple(out)

                node.register_hook(post)
                return True
        if type(node).__name__ not in _VIEWS:
            return False
        node = edges[0][0]
    return False


def weighted_bias(g, w, B, channels):
    """Σ_i w_i Σ_t e_it of a layer's output gradient e: channels on dim 1 and (B, C, …)
    (a convolution's), else features last, in B or B·T sample-major rows (a GEMM's)."""
    if w.dtype != g.dtype:
        w = w.to(g.dtype)
    if channels:
        return g.sum(tuple(range(2, g.dim()))).T @ w
    if g.dim() == 2 and g.shape[0] == B:
        return w @ g
    return w @ g.reshape(B, -1, g.shape[-1]).sum(1)


def scaled_embedding(plan, weighting, args, kwargs):
    """(y, True) for an Embedding call whose node gets the row-scaling pre-hook, or
    (y, False) when y's node is not the embedding's own scatter into the table (then it is
    plain)."""
    y = plan.original(*args, **kwargs)
    node = y.grad_fn if isinstance(y, torch.Tensor) else None
    if (node is None or type(node).__name__ != "EmbeddingBackward0"
            or getattr(node.next_functions[0][0], "variable", None) is not plan.weight):
        return y, False
    w = weighting.rows(plan.weight, args[0].shape[0])

    def pre(grad_outputs):
        g = grad_outputs[0]
        return (g * weighting.shaped(w, g),)

    node.register_prehook(pre)
    return y, True


def hooked_norm(plan, weighting, norm_of, args, kwargs):
    """(y, True) for a norm call whose one native node gets the weighted-affine post-hook
    (in C++ where the capture's kernels take the call: CPU, float32/64), or (y, False) when
    its graph is not that node on x (then it is plain)."""
    x = args[0]
    y = plan.original(*args, **kwargs)
    if not isinstance(y, torch.Tensor):
        return y, False
    params = plan.handler.params
    if NATIVE is not None and x.is_cpu:
        B = x.shape[0]
        w = weighting.rows(params["weight"], B) if "weight" in params else None
        wb = weighting.rows(params["bias"], B) if "bias" in params else None
        if NATIVE.capture_hook_norm_affine(y, x, w if w is not None else wb,
                                           wb if wb is not None else w,
                                           1 if w is not None else -1,
                                           2 if wb is not None else -1):
            return y, True
    norm = norm_of(y)
    if norm is None or norm.input is not x:
        return y, False
    slots = [(k, params[n]) for k, n in enumerate(("weight", "bias"), 1) if n in params]

    def post(grad_inputs, grad_outputs):
        grads = norm.affine(grad_outputs[0], params, weighting)
        out = list(grad_inputs)
        for k, p in slots:
            if out[k] is not None:
                out[k] = grads[id(p)]
        return tuple(out)

    y.grad_fn.register_hook(post)
    return y, True
