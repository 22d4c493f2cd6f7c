"""The Capture context manager: module forward hooks save each supported layer call's inputs,
tensor hooks on the outputs save their gradients, and the per-sample-gradient Gram, weighted
sums and projections of the whole model or of each layer come from those, through the ops."""
import contextlib
import math
import warnings

import torch
from torch import nn

from . import _generic
from ._direct import DirectUses
from ._factors import Factors
from ._fallback import FallbackHandler
from ._kinds import sum_gram
from ._layers import HANDLERS as LAYER_HANDLERS
from ._norms import HANDLERS as NORM_HANDLERS
from . import _traced
from ._traced import TracedCall, forget_tickets
from ._weighted import Weighting

HANDLERS = {**LAYER_HANDLERS, **NORM_HANDLERS}
# Handlers whose calls record in-graph under torch.compile (capture._traced): they save from
# the call's input and output alone (transformers Conv1D verified at its first call, inside
# the op, when no fallback could take it instead).
TRACED = frozenset((*HANDLERS.values(), _generic.Conv1DHandler))
SUPPORTED = (", ".join(f"nn.{t.__name__}" for t in HANDLERS) + ", transformers Conv1D, "
             "per-channel scale/shift modules (norm variants, layer scale), BatchNorm "
             "subclasses, parameters used directly through broadcasting ops")


def _disable_dynamo(fn):
    """Hooks run eagerly under torch.compile (their bookkeeping is not traced: no guard on
    the number of captured calls, so a compiled model compiles once per shape). Outside a
    compile fn is called as it is: the disabled wrapper's frame-callback swap (a few µs)
    is paid only where dynamo traces."""
    try:
        disabled = torch._dynamo.disable(fn, recursive=True)
    except Exception:  # pragma: no cover - torch without dynamo
        return fn

    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)
    return call


class _EagerCall:
    """A captured module's call (its forward and hooks) as one eager call under torch.compile,
    set as the module's _call_impl while a capture is active: dynamo breaks the graph at the
    layer's boundary instead of inside nn.Module._call_impl at each hook, where every break
    leaves resume frames of _call_impl's hook loops to guard and run (a compiled captured
    step took ~2x the eager forward and backward; bench/bench_compile.py); the code between
    captured layers still compiles. It holds the module (not a bound method), so a deepcopy
    or pickle of the model made meanwhile calls its own module."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return self._eager(*args, **kwargs)
        return type(self.module)._call_impl(self.module, *args, **kwargs)

    @torch._dynamo.disable(recursive=True)
    def _eager(self, *args, **kwargs):
        return type(self.module)._call_impl(self.module, *args, **kwargs)


def _handler_class(module):
    """The handler of module's type, or None. A subclass counts only if it keeps the base
    forward (a subclass with its own forward may use its weights differently)."""
    for base, handler in HANDLERS.items():
        if type(module) is base or (isinstance(module, base)
                                    and type(module).forward is base.forward):
            return handler
    return None


class _Call:
    """One call of a captured module: what its handler saved and its output gradient(s)."""

    def __init__(self, handler, saved, n_outputs):
        self.handler, self.saved = handler, saved
        self.grads = [None] * n_outputs
        self.repeated = False  # an output received a gradient twice: two backward passes

    def receiver(self, k):
        def receive(grad):
            if self.grads[k] is None:
                self.grads[k] = grad.detach()
            else:
                self.repeated = True
                self.grads[k] = self.grads[k] + grad
        return receive


class Capture:
    """Capture(model, *, loss_reduction="mean", fallback=False, keep=False, backend=None)

    Inside `with Capture(model) as cap:`, run a normal forward and backward of one batch; the
    capture records the inputs and output gradients of every layer with trainable parameters
    and gives the per-sample gradients g_i = ∇_θ ℓ_i (only trainable parameters: those with
    requires_grad=False are excluded) in factored form:

      cap.gram()                      K = UᵀU = Σ_layers K_layer (B × B), K_ij = ⟨g_i, g_j⟩
      cap.gram(by="module")           {module name: K}; by="parameter": {parameter name: K}
      cap.gram(diagonal=True)         diag K = (‖g_i‖²)
      cap.gram(other_cap)             the cross-Gram Uᵀ U' with a second captured batch
      cap.weighted_sum(c)             {param: U c}, c (B,) or (B, m) -> (m, *param.shape)
      cap.weighted_sum(c, write_grad=True)   also sets param.grad = U c (c (B,))
      cap.project(V)                  Uᵀ V (B,) for V {param: tensor}; (B, m) for a list of m
      cap.weighted_sum({block: c_b}, by="module")   block-diagonal: U_b c_b per module
      cap.project(V, by="module")     {module name: U_bᵀ V_b}
      cap.factors()                   {param: Factors}: one parameter's U in factored form
                                      (Gram, U c, Uᵀ V, layer tokens, sketch; kept after
                                      release — see lowrank_kernels.capture.Factors)
      with cap.weighted(weights): forward    the backward of that forward leaves p.grad =
                                      U c_p (weights(B) -> {id(p): c_p / s}), at the cost of
                                      a plain backward (see capture._weighted)
      lowrank_kernels.ng_solve(cap, λ)   (F + λI)⁻¹ ḡ (or v) through the Woodbury identity

    loss_reduction: how the loss that is backpropagated depends on the per-sample losses ℓ_i:
      "mean" (loss = (1/B) Σ_i ℓ_i, the default of torch losses), "sum" (loss = Σ_i ℓ_i), or
      a number s (loss = s Σ_i ℓ_i, e.g. s = 1/(B T) for a token mean). The captured output
      gradients are divided by it, so g_i is the unscaled ∇ℓ_i.
    Supported layers: nn.Linear (inputs (B, *, d)), nn.Conv2d (any stride, padding, padding
      mode, dilation, groups), nn.Embedding (padding_idx), nn.LayerNorm, nn.RMSNorm,
      nn.GroupNorm, nn.BatchNorm1d/2d/3d (in train mode g_i is sample i's share of the batch
      gradient: see lowrank_kernels.capture._norms). A layer called several times (weight
      sharing) and a parameter shared by several layers (tied embedding and output weights)
      get g_i = the sum over the calls, and their Gram includes the calls' cross terms.
    A parameter must reach the loss through its module's forward: one that receives a
      gradient while its module was never called raises (e.g. F.linear(x, layer.weight));
      one used both through its module and directly is not detected.
    The batch is dim 0 of every captured input and output, and one Capture holds one batch.
    fallback: False (default) raises for any other module with trainable parameters of its
      own; True computes those parameters' per-sample gradients with torch.func
      (vmap(grad) over that module alone; small modules).
    keep: False (default) releases the captured tensors when the `with` block ends (compute
      inside it); True keeps them until `release()` (e.g. for a cross-Gram of two batches).
    backend: passed to the ops ('auto' by default).
    """

    def __init__(self, model: nn.Module, *, loss_reduction="mean", fallback=False, keep=False,
                 backend=None, check=True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"capture: model must be an nn.Module, got {type(model).__name__}")
        if not (loss_reduction in ("mean", "sum") or (isinstance(loss_reduction, (int, float))
                                                      and loss_reduction > 0)):
            raise ValueError("capture: loss_reduction must be 'mean', 'sum' or a positive "
                             f"number (the loss's scale of Σ_i ℓ_i), got {loss_reduction!r}")
        if not isinstance(check, bool):
            raise TypeError(f"capture: check must be True or False, got {check!r}")
        self.model, self.loss_reduction, self.keep, self.backend = (
            model, loss_reduction, keep, backend)
        self.fallback, self.check = fallback, check
        self._param_names = {}  # id -> (name, param), in model.named_parameters() order
        for name, p in model.named_parameters():
            if p.requires_grad:
                self._param_names[id(p)] = (name, p)
        self._owner = {}  # id(param) -> name of the first module holding it
        self._handlers = []  # (module, handler, kind): kind "native", "verify" or "fallback"
        self._direct = []  # (module, name, {param name: param}) used directly in a forward
        for module_name, module in model.named_modules():
            params = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
            if not params:
                continue
            for p in params.values():
                self._owner.setdefault(id(p), module_name)
            handler, kind = self._recognize(module_name, module, params)
            if handler is not None:
                self._handlers.append((module, handler, kind))
            elif any(True for _ in module.parameters()) and any(
                    any(True for _ in c.parameters()) for c in module.children()):
                # a module with layers inside and parameters of its own (cls_token,
                # pos_embed, layer scale): followed through its forward (see _direct)
                self._direct.append((module, module_name or type(module).__name__, params))
            elif fallback:
                self._handlers.append((module, self._fallback_handler(module_name, module,
                                                                      params), "fallback"))
            else:
                raise TypeError(
                    f"capture: module '{module_name}' ({type(module).__name__}) has trainable "
                    f"parameters ({', '.join(params)}) but is not a supported layer ({SUPPORTED}"
                    "); pass fallback=True to get its per-sample gradients with torch.func "
                    "(small modules), or freeze them (requires_grad=False)")
        self._handler_of = {id(m): h for m, h, _ in self._handlers}
        self._eager_hooks = {}  # id(module) -> its forward hook, for a TracedCall's odd call
        self._hooks = []
        self._hook_set = None  # the hook functions (_hook_fns), built at the first entry
        self._patched = []  # modules whose _call_impl this capture replaced while active
        self._calls = []
        self._seen = {}  # id(param) -> how many backward passes reached it while capturing
        self._hook_grads = {}  # id(param) -> its gradient this batch (for the first check)
        self._checked = not check
        self._forward_batch = None  # B of the model input of the running forward
        self._low_precision = False  # a captured output was fp16/bf16 (autocast)
        self._kinds = {}  # id(module) -> its hook's state ({"kind": native/verify/fallback})
        self._weighting = None  # the Weighting of a running `weighted` block
        self._weighted_forwards = None  # the modules' weighted forwards (_weighted.Weighting)
        self._weighted_batch = False  # this batch's forward ran (partly) weighted
        self._skip_record = None  # the module whose call just went through the weighting
        self._native_norms = set()  # id(module): a norm whose weighted calls hook its node
        self._active = False
        self._cache = None
        self._factors = None  # (the _contributions() dict it was built from, {param: Factors})

    def _recognize(self, name, module, params):
        """(handler, kind) for a module with trainable parameters of its own, or (None, None)."""
        cls = _handler_class(module)
        if cls is not None:
            return cls(name, module, params), "native"
        if _generic.is_conv1d(module, params):
            return _generic.Conv1DHandler(name, module, params), "verify"
        if _generic.is_batchnorm_subclass(module):
            return _generic.BatchNormSubclassHandler(name, module, params), "verify"
        roles = _generic.affine_roles(module, params)
        if roles is not None:
            return _generic.AffineHandler(name, module, params, roles), "verify"
        return None, None

    def _fallback_handler(self, name, module, params):
        numel = sum(p.numel() for p in params.values())
        warnings.warn(
            f"capture: module '{name}' ({type(module).__name__}) has no native per-sample "
            f"gradients; its {numel:,} parameter values ({', '.join(params)}) go through the "
            f"torch.func fallback: one more forward and backward of the module per batch, "
            f"vmapped over the B samples, and B × {numel:,} materialized values",
            stacklevel=4)
        return FallbackHandler(name, module, params, self)

    # ---- recording ---------------------------------------------------------------------
    def _hook_fns(self):
        """The capture's hook functions, built at its first entry and kept for the next ones
        (a verified module stays verified; a dynamo-disabled wrapper costs ~30 µs to build):
        (batch pre-hook, [(module, forward hook, traced)], [(module, pre, post)],
        [(param, hook)])."""
        if self._hook_set is None:
            forward = []
            for module, handler, kind in self._handlers:
                hook = _disable_dynamo(self._forward_hook(module, handler, kind))
                traced = (_traced.AVAILABLE and type(handler) in TRACED
                          and (kind == "native" or not self.fallback))
                forward.append((module, hook, traced))
            direct = [(module, *map(_disable_dynamo, self._direct_hooks(name, params)))
                      for module, name, params in self._direct]
            param_hooks = [(p, _disable_dynamo(self._param_hook(id(p))))
                           for _, p in self._param_names.values()]
            self._hook_set = (_disable_dynamo(self._batch_hook), forward, direct, param_hooks)
        return self._hook_set

    def __enter__(self):
        if self._hooks:
            raise RuntimeError("capture: this Capture is already active")
        self.release()
        batch_hook, forward, direct, param_hooks = self._hook_fns()
        self._hooks.append(self.model.register_forward_pre_hook(batch_hook, with_kwargs=True))
        traced = []
        for module, hook, can_trace in forward:
            if can_trace and "_call_impl" not in module.__dict__:
                traced.append(module)
                self._eager_hooks[id(module)] = hook  # for a call the TracedCall cannot take
                continue
            self._hooks.append(module.register_forward_hook(hook, with_kwargs=True))
        for module, pre, post in direct:
            self._hooks.append(module.register_forward_pre_hook(pre))
            self._hooks.append(module.register_forward_hook(post, always_call=True))
        for p, hook in param_hooks:
            self._hooks.append(p.register_hook(hook))
        for module in traced:
            call = TracedCall.of(module)
            call.capture = self
            module.__dict__["_call_impl"] = call
            self._patched.append(module)
        for module, _, _ in self._handlers:
            if "_call_impl" not in module.__dict__:  # not already replaced (another capture)
                module.__dict__["_call_impl"] = _EagerCall(module)
                self._patched.append(module)
        self._active = True
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        for module in self._patched:
            call = module.__dict__.pop("_call_impl")
            if isinstance(call, TracedCall):
                call.capture = None
        self._hooks, self._patched = [], []
        self._active = False
        if not self.keep:
            self.release()
        return False

    def release(self):
        """Drop every captured tensor (the hooks stay while the `with` block runs)."""
        forget_tickets(self)
        self._calls = []
        self._seen = {}
        self._hook_grads = {}
        self._cache = None
        self._weighted_batch = False

    @contextlib.contextmanager
    def weighted(self, weights):
        """Inside, a forward (grad enabled, the capture active) runs every captured layer so
        that its backward gives each parameter p the weighted sum of its per-sample
        gradients directly: p.grad = Σ_i c_i g_i with weights(B) -> {id(p): w (B,)},
        w_i = c_i / s (s = loss_scale(B)), while the input gradients stay the plain ones
        (see lowrank_kernels.capture._weighted). A call it cannot take is recorded as usual
        (`recorded`): its parameters' .grad then holds s·U_call 1 for that call instead."""
        if not self._active:
            raise RuntimeError("capture.weighted: the capture is not active")
        if self._weighting is not None:
            raise RuntimeError("capture.weighted: already inside a weighted block")
        self._weighting = Weighting(self, weights)
        self._weighted_batch = True
        try:
            with self._weighting:
                yield
        finally:
            self._weighting = None

    @property
    def recorded(self) -> bool:
        """Whether a call of this batch was recorded (with a gradient)."""
        return any(g is not None for call in self._calls for g in call.grads)

    def _kind_of(self, module):
        state = self._kinds.get(id(module))
        return None if state is None else state["kind"]

    @contextlib.contextmanager
    def paused(self):
        """No recording inside (the fallback re-runs modules under torch.func)."""
        active, self._active = self._active, False
        try:
            yield
        finally:
            self._active = active

    def _batch_hook(self, module, args, kwargs):
        """B of this forward: dim 0 of the model's first tensor input."""
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor) and a.dim() >= 1:
                self._forward_batch = a.shape[0]
                return
        self._forward_batch = None

    def _record(self, handler, saved, outputs):
        """Hook the gradients of `outputs` (a list) for one call of `handler`."""
        call = _Call(handler, saved, len(outputs))
        for k, o in enumerate(outputs):
            if isinstance(o, torch.Tensor) and o.requires_grad:
                o.register_hook(call.receiver(k))
        self._calls.append(call)
        self._cache = None

    def _record_traced(self, module, x, y):
        """One call of a module recording through its TracedCall (capture._traced): what
        the forward hook does for it; the caller hooks y's gradient to the call."""
        handler, state = self._handler_of[id(module)], self._kinds[id(module)]
        if state["kind"] == "verify":
            self._verify(module, handler, (x,), {}, y, state)
        if y.dtype in (torch.float16, torch.bfloat16):
            self._low_precision = True
        call = _Call(handler, handler.save((x,), y), 1)
        self._calls.append(call)
        self._cache = None
        return call

    def _direct_hooks(self, name, params):
        modes = []

        def record(handler, q):
            if self._weighting is not None:
                self._weighting.scale_direct(handler, q)
            else:
                self._record(handler, None, [q])

        def pre(module, args):
            if self._active and torch.is_grad_enabled():
                mode = DirectUses(name, params, lambda: self._forward_batch, record)
                mode.__enter__()
                modes.append(mode)
            else:
                modes.append(None)

        def post(module, args, output):
            mode = modes.pop() if modes else None
            if mode is not None:
                mode.__exit__(None, None, None)

        return pre, post

    def _forward_hook(self, module, handler, kind):
        state = {"kind": kind}
        self._kinds[id(module)] = state

        def hook(module, args, kwargs, output):
            if self._skip_record is module:  # its call went through the weighting
                self._skip_record = None
                return None
            if not self._active or not torch.is_grad_enabled():
                return None
            if state["kind"] == "verify":
                self._verify(module, handler, args, kwargs, output, state)
            is_fallback = state["kind"] == "fallback"
            active = state.get("handler", handler)
            outputs = output if isinstance(output, (tuple, list)) else (output,)
            if not is_fallback and (len(outputs) != 1 or not isinstance(output, torch.Tensor)):
                raise TypeError(f"capture: module '{active.name}' returned "
                                f"{type(output).__name__}, expected a tensor")
            if not any(isinstance(o, torch.Tensor) and o.requires_grad for o in outputs):
                return None
            replaced = None
            if not is_fallback:
                args, output = self._broadcast(args, output)
                if output is not outputs[0]:
                    replaced = output
                outputs = (output,)
            if is_fallback:
                saved = active.save(args, kwargs)
            elif isinstance(active, _generic.AffineHandler):
                with self.paused():
                    saved = active.save(args, kwargs, output)
            else:
                saved = active.save(args, output)
            if outputs[0] is not None and isinstance(outputs[0], torch.Tensor) and \
                    outputs[0].dtype in (torch.float16, torch.bfloat16):
                self._low_precision = True
            self._record(active, saved, list(outputs))
            return replaced
        return hook

    def _verify(self, module, handler, args, kwargs, output, state):
        """First call of a module recognized by what it computes: check it, once."""
        try:
            with self.paused(), torch.no_grad():
                handler.verify(args, kwargs, output)
            state["kind"] = "native"
        except _generic.NotRecognized as error:
            if not self.fallback:
                raise TypeError(f"capture: {error}; pass fallback=True to get its per-sample "
                                "gradients with torch.func, or freeze its parameters") from None
            state["kind"] = "fallback"
            state["handler"] = self._fallback_handler(handler.name, module, handler.params)

    def _broadcast(self, args, output):
        """A call with a batch of 1 in a forward of B > 1 samples (position ids (1, T)), whose
        output broadcasts over the batch: its output is expanded to B rows (the same values)
        so that each sample's share of the gradient arrives in its own row."""
        B = self._forward_batch
        if (B is None or B == 1 or not isinstance(output, torch.Tensor) or output.dim() == 0
                or output.shape[0] != 1 or not args or not isinstance(args[0], torch.Tensor)
                or args[0].dim() == 0 or args[0].shape[0] != 1):
            return args, output
        x = args[0].expand(B, *args[0].shape[1:])
        return (x, *args[1:]), output.expand(B, *output.shape[1:])

    def _param_hook(self, key):
        def hook(grad):
            if self._active and not self._weighted_batch:
                self._seen[key] = self._seen.get(key, 0) + 1
                if not self._checked:  # a copy: DDP averages the .grad it aliases in place
                    self._hook_grads[key] = grad.detach().clone()
        return hook

    # ---- the per-sample gradients, per parameter -----------------------------------------
    def _scale(self, B):
        if self.loss_reduction == "mean":
            return 1.0 / B
        if self.loss_reduction == "sum":
            return 1.0
        return float(self.loss_reduction)

    def _contributions(self):
        """{id(param): [contribution, …]}: the calls' factored per-sample gradients, with
        calls of one kind merged where their per-sample gradients simply add."""
        if self._cache is not None:
            return self._cache
        calls = [c for c in self._calls if any(g is not None for g in c.grads)]
        if not calls and not self._seen:
            raise RuntimeError("capture: nothing captured — run the forward and backward of a "
                               "batch inside `with Capture(model) as cap:` (with keep=True to "
                               "use the capture after the block)")
        twice = sorted(self._param_names[k][0] for k, n in self._seen.items()
                       if n > 1 and k in self._param_names)
        if twice or any(c.repeated for c in calls):
            where = f" (parameter(s) {', '.join(twice[:3])}{', …' if len(twice) > 3 else ''})"
            raise RuntimeError(
                "capture: gradients from more than one backward pass reached this capture"
                f"{where if twice else ''} — a double backward (retain_graph / create_graph) "
                "or gradients accumulated over micro-batches: their per-sample gradients "
                "would add up into a wrong Gram. One Capture holds one forward and one "
                "backward of one batch: call release() (or the optimizer's step) in between")
        per_param = {}
        B = None
        first = None
        for call in calls:
            b = next(g for g in call.grads if g is not None).shape[0]
            if B is None:
                B, first = b, call.handler.name
            elif b != B:
                raise ValueError(
                    f"capture: module '{call.handler.name}' saw a batch of {b} samples, "
                    f"'{first}' saw {B}: the batch is dim 0 of every captured input and "
                    "output, and one Capture holds one batch (a module called on a batch of 1 "
                    "that broadcasts over the batch is expanded only when the model's first "
                    "tensor input has the batch in dim 0)")
            scale = self._scale(B)
            grads = [None if g is None else g / scale for g in call.grads]
            E = grads if isinstance(call.handler, FallbackHandler) else grads[0]
            for p, contribution in call.handler.contributions(call.saved, E, self.backend):
                bucket = per_param.setdefault(id(p), [])
                for k, existing in enumerate(bucket):
                    if existing.can_merge(contribution):
                        bucket[k] = existing.merge(contribution)
                        break
                else:
                    bucket.append(contribution)
        missing = [self._param_names[k][0] for k in self._seen
                   if k not in per_param and k in self._param_names]
        if missing:
            raise RuntimeError(
                f"capture: parameter(s) {', '.join(sorted(missing))} received gradients but "
                "their module's forward was never called with them (used outside their module, "
                "e.g. F.linear(x, layer.weight) or nn.MultiheadAttention's out_proj): their "
                "per-sample gradients cannot be captured")
        if B is None:
            raise RuntimeError("capture: nothing captured — no captured layer output received "
                               "a gradient")
        if not self._checked and self._hook_grads:
            self._check_sums(per_param, B)
        self._batch_size = B
        self._cache = per_param
        return per_param

    def _check_sums(self, per_param, B):
        """The first batch's consistency check: s·U 1 = the gradient backward gave each
        parameter. A parameter also used outside its module, or a layer whose output passes
        through an operation that mixes samples in a way the capture cannot see, fails it."""
        s = self._scale(B)
        # a parameter whose gradient vanishes by symmetry (a key bias under softmax) is
        # compared at the scale of the whole model's gradient
        floor = 1e-4 * math.sqrt(sum(float(torch.linalg.vector_norm(g.double())) ** 2
                                     for g in self._hook_grads.values()))
        for key, grad in self._hook_grads.items():
            if key not in per_param or key not in self._param_names:
                continue
            parts = per_param[key]
            dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
            ones = torch.ones(B, dtype=dtype, device=grad.device)
            total = sum(c.weighted_sum(ones.to(_operand_dtype(c))).to(dtype) for c in parts)
            ref = grad.to(dtype)
            norm = float(torch.linalg.vector_norm(ref))
            error = float(torch.linalg.vector_norm(s * total - ref))
            # under autocast the layers' outputs (and so .grad) round to 8 bits of mantissa
            tol = {torch.float64: 1e-8}.get(dtype, 8e-2 if self._low_precision else 1e-3)
            if not math.isfinite(norm) or not math.isfinite(error):
                continue  # the optimizers' finite checks handle a non-finite batch
            if error > tol * max(norm, floor, 1e-300):
                name = self._param_names[key][0]
                raise RuntimeError(
                    f"capture: the per-sample gradients of '{name}' do not add up to its "
                    f"gradient (relative difference {error / norm:.2g}): it is used outside "
                    "its module's forward too (e.g. a head written x @ emb.weight.T besides "
                    "emb(idx)), or its layer's output goes through an operation that mixes "
                    "samples. Use it only through its module; Capture(check=False) skips "
                    "this first-batch check")
        self._checked = True
        self._hook_grads = {}

    @property
    def recording(self) -> bool:
        """True while the `with` block is active and not paused()."""
        return self._active

    def loss_scale(self, batch_size: int) -> float:
        """s in loss = s·Σ_i ℓ_i under this capture's loss_reduction (1/B, 1, or the number)."""
        return self._scale(batch_size)

    @property
    def batch_size(self) -> int:
        self._contributions()
        return self._batch_size

    def factors(self) -> dict:
        """{param: Factors} in model order: each captured parameter's per-sample gradients
        U = [g_1 … g_B] in factored form, summed over the calls that used it (see
        lowrank_kernels.capture.Factors: gram, weighted_sum, project, tokens, sketch,
        state_dict). A parameter that got no per-sample gradient from this batch (its module
        was not called) has no entry. The same objects come back until the next batch or
        `release()`; they hold the captured tensors, so they stay valid after both."""
        per_param = self._contributions()
        if self._factors is None or self._factors[0] is not per_param:
            built = {p: Factors(per_param[key]) for key, (_, p) in self._param_names.items()
                     if per_param.get(key)}
            self._factors = (per_param, built)
        return dict(self._factors[1])

    def parameters(self):
        """[(name, param)] of the captured (trainable) parameters, in model order."""
        return list(self._param_names.values())

    # ---- Gram ----------------------------------------------------------------------------
    def gram(self, other=None, *, diagonal=False, by="model"):
        """K_ij = ⟨g_i, g'_j⟩ summed over the captured parameters (B × B2; with diagonal=True
        the vector diag K, which needs B2 = B). other: a second Capture of the same model
        (keep=True) for the cross-Gram, else the Gram of this batch. by: "model" (one
        tensor), "module" ({module name: K}; a shared parameter counts in the first module
        that holds it) or "parameter" ({parameter name: K})."""
        if by not in ("model", "module", "parameter"):
            raise ValueError(f"capture.gram: by must be 'model', 'module' or 'parameter', "
                             f"got {by!r}")
        mine = self._contributions()
        theirs = None
        if other is not None:
            if not isinstance(other, Capture):
                raise TypeError(f"capture.gram: other must be a Capture, got "
                                f"{type(other).__name__}")
            theirs = other._contributions()
            if diagonal and other.batch_size != self.batch_size:
                raise ValueError(f"capture.gram: diagonal=True needs other's batch size "
                                 f"{other.batch_size} to equal this batch size "
                                 f"{self.batch_size}")
        B = self.batch_size
        B2 = B if other is None else other.batch_size
        shape = (B,) if diagonal else (B, B2)
        results = {}
        for key, (name, p) in self._param_names.items():
            K = sum_gram(mine.get(key, []), None if theirs is None else theirs.get(key, []),
                            diagonal)
            label = {"model": None, "module": self._owner.get(key), "parameter": name}[by]
            if K is not None:  # a parameter with no gradient this batch adds nothing
                previous = results.get(label)
                results[label] = K if previous is None else previous + K.to(previous.dtype)
            elif label not in results:
                results[label] = None
        dtype = self._result_dtype()
        device = p.device
        out = {k: torch.zeros(shape, dtype=dtype, device=device) if v is None else v.to(dtype)
               for k, v in results.items()}
        return out[None] if by == "model" else out

    def _result_dtype(self):
        for contributions in self._contributions().values():
            for c in contributions:
                if _contribution_dtype(c) == torch.float64:
                    return torch.float64
        return torch.float32

    # ---- weighted sums and projections ---------------------------------------------------
    def weighted_sum(self, c, *, by="model", write_grad=False):
        """{param: U c} with U c = Σ_i c_i g_i: c (B,) gives param-shaped tensors, c (B, m) gives
        (m, *param.shape). by="module" or "parameter": c is a dict {block label: c_block} with
        one coefficient vector per block (the labels of gram(by=...)): each parameter gets
        U_block c_block — the block-diagonal weighted sum. write_grad=True (c (B,) only) also
        sets each param.grad to U c (in the param's dtype), replacing what backward left there."""
        contributions = self._contributions()
        B = self.batch_size
        per_block = self._coefficients_by_block(c, by, B)
        if write_grad and any(w.dim() != 1 for w in per_block.values()):
            raise ValueError("capture.weighted_sum: write_grad=True needs c of shape (B,)")
        dtype = self._result_dtype()
        out = {}
        for key, (name, p) in self._param_names.items():
            weights_all = per_block[self._label(key, by)]
            total = torch.zeros((*weights_all.shape[1:], *p.shape), dtype=dtype, device=p.device)
            for contribution in contributions.get(key, []):
                weights = weights_all.to(device=p.device, dtype=_operand_dtype(contribution))
                total += contribution.weighted_sum(weights).to(dtype)
            out[p] = total
            if write_grad:
                p.grad = total.to(p.dtype)
        return out

    def blocks(self, by="module"):
        """[(label, [param])] in model order: the blocks of gram / weighted_sum / project with
        the same `by` — "model": one block, label None; "module": the first module (in
        model.named_modules() order) that holds a parameter directly, labelled by its name
        ("" for the model itself); "parameter": one block per parameter, labelled by its
        name. The optimizers and ng_solve group by this one rule."""
        if by not in ("model", "module", "parameter"):
            raise ValueError(f"capture.blocks: by must be 'model', 'module' or 'parameter', "
                             f"got {by!r}")
        out = {}
        for key, (_, p) in self._param_names.items():
            out.setdefault(self._label(key, by), []).append(p)
        return list(out.items())

    def _label(self, key, by):
        """The block of parameter id `key` under by = model / module / parameter."""
        return {"model": None, "module": self._owner.get(key),
                "parameter": self._param_names[key][0]}[by]

    def _coefficients_by_block(self, c, by, B):
        """{block label: coefficients (B,) or (B, m)}, checked."""
        if by not in ("model", "module", "parameter"):
            raise ValueError(f"capture: by must be 'model', 'module' or 'parameter', got {by!r}")
        labels = {self._label(key, by) for key in self._param_names}
        if by == "model":
            per_block = {None: c}
        elif isinstance(c, dict):
            missing = sorted(str(lbl) for lbl in labels if lbl not in c)
            if missing:
                raise ValueError(f"capture.weighted_sum: c has no coefficients for block(s) "
                                 f"{', '.join(missing)} (by={by!r})")
            per_block = {lbl: c[lbl] for lbl in labels}
        else:
            raise TypeError(f"capture.weighted_sum: with by={by!r}, c must be a dict "
                            "{block label: tensor (B,) or (B, m)}")
        for lbl, w in per_block.items():
            where = "c" if lbl is None else f"c[{lbl!r}]"
            if not isinstance(w, torch.Tensor) or not w.is_floating_point():
                raise TypeError(f"capture.weighted_sum: {where} must be a floating tensor of "
                                f"shape (B,) or (B, m), got "
                                f"{type(w).__name__ if not isinstance(w, torch.Tensor) else w.dtype}")
            if w.dim() not in (1, 2) or w.shape[0] != B:
                raise ValueError(f"capture.weighted_sum: {where} must have shape ({B},) or "
                                 f"({B}, m), got {tuple(w.shape)}")
        return per_block

    def project(self, V, *, by="model"):
        """Uᵀ V: (Uᵀ V)_i = Σ_params ⟨g_i, V[param]⟩. V: {param: tensor of param.shape} -> (B,),
        or a list of m such dicts -> (B, m). Every captured parameter needs an entry.
        by="module" or "parameter": {block label: (Uᵀ V) over that block's parameters}."""
        if by not in ("model", "module", "parameter"):
            raise ValueError(f"capture.project: by must be 'model', 'module' or 'parameter', "
                             f"got {by!r}")
        single = isinstance(V, dict)
        directions = [V] if single else list(V)
        if not directions or not all(isinstance(v, dict) for v in directions):
            raise TypeError("capture.project: V must be a dict {param: tensor} or a non-empty "
                            "list of such dicts")
        contributions = self._contributions()
        B = self.batch_size
        captured = set(self._param_names)
        for k, v in enumerate(directions):
            where = "V" if single else f"V[{k}]"
            for p in v:
                if id(p) not in captured:
                    raise ValueError(f"capture.project: {where} has a tensor for a parameter "
                                     "that is not captured (frozen, or not in the model)")
            for name, p in self._param_names.values():
                if p not in v:
                    raise ValueError(f"capture.project: {where} has no tensor for parameter "
                                     f"'{name}'")
                if tuple(v[p].shape) != tuple(p.shape):
                    raise ValueError(f"capture.project: {where}['{name}'] must have shape "
                                     f"{tuple(p.shape)}, got {tuple(v[p].shape)}")
        dtype = self._result_dtype()
        device = next(iter(self._param_names.values()))[1].device
        blocks = {}
        for key, (name, p) in self._param_names.items():
            out = blocks.setdefault(self._label(key, by), torch.zeros(
                (B, len(directions)), dtype=dtype, device=device))
            stacked = None
            for contribution in contributions.get(key, []):
                if stacked is None:
                    stacked = torch.stack([v[p] for v in directions])
                Vp = stacked.to(dtype=_operand_dtype(contribution))
                out += contribution.project(Vp).to(dtype).reshape(B, -1)
        blocks = {lbl: (out[:, 0] if single else out) for lbl, out in blocks.items()}
        return blocks[None] if by == "model" else blocks


def _contribution_dtype(c):
    return c.G.dtype if hasattr(c, "G") else c.E.dtype


def _operand_dtype(c):
    """The dtype in which weights c and directions V enter an op for this contribution."""
    return torch.float64 if _contribution_dtype(c) == torch.float64 else torch.float32
