"""Capture inside a torch.compile'd graph: the recording of a layer call as two custom ops
that dynamo and AOTAutograd trace in place of Python hooks, so that a compiled model under
Capture compiles whole — its captured layers included — instead of breaking the graph at
every layer.

While a capture is active, each module whose handler saves from its input alone (Linear,
Conv2d, Embedding, the torch norms, transformers Conv1D; capture._capture.TRACED) calls
through its `TracedCall` (set as the module's `_call_impl`): the module's own call, then

    forward:   ticket = _capture_call(x, y, site)    saved = handler.save(x, y), a _Call
                                                     recorded, its ticket
    backward:  y's hook  _capture_grad(g, ticket)    that call's output gradient

Both ops run Python at run time (what the eager hooks do) and are registered as ordered
side effects, which keeps them in the graph and in program order (a custom op with no used
output is otherwise removed). What they keep is copied (x, and g): a compiled graph reuses
a buffer after its last use in the graph — the compiler does not know that an op kept a
reference — and may recompute an activation for the backward instead of saving it. The
ticket (a CPU int64 scalar: no device sync to read it) pairs a gradient with its own call,
as the eager hook's closure does, also when a module is called twice in one forward.
Eagerly (not compiling), the same TracedCall records directly, as the eager hooks do.

One TracedCall per module, kept across captures (a new Capture each step reuses it), and
`capture` names the active capture it records for: what dynamo guards on does not change
from step to step, so a compiled model compiles once per input shape. While
a `Capture.weighted` block runs, or for any other handler, the module's call is one eager
call (`_EagerCall`), as before.
"""
import copy
import itertools
import weakref

import torch

_SITES = weakref.WeakValueDictionary()  # site -> TracedCall
_NEXT_SITE = itertools.count()
_TRACED_CALLS = weakref.WeakKeyDictionary()  # module -> its TracedCall
_TICKETS = {}  # ticket -> (the capture, its _Call) until the call's gradient arrives
_NEXT_TICKET = itertools.count(1)


_LIB = torch.library.Library("lowrank_kernels", "FRAGMENT")
# Plain definitions (no autograd wrapper: their inputs are detached): one dispatcher call each.
_LIB.define("_capture_call(Tensor x, Tensor y, int site) -> Tensor")
_LIB.define("_capture_grad(Tensor g, Tensor ticket) -> ()")


def _capture_call(x, y, site):
    """Record one call of the module at `site` (its input x, output y); its ticket."""
    traced = _SITES.get(site)
    call = None if traced is None else traced.record(x.clone(), y)
    ticket = 0
    if call is not None:
        ticket = next(_NEXT_TICKET)
        _TICKETS[ticket] = (traced.capture, call)
    return torch.scalar_tensor(ticket, dtype=torch.int64)


def _capture_grad(g, ticket):
    """Hand the output gradient g to the call its ticket names (a copy: see the module doc)."""
    entry = _TICKETS.get(int(ticket))
    if entry is not None:
        entry[1].receiver(0)(g.clone())


_LIB.impl("_capture_call", _capture_call, "CompositeExplicitAutograd")
_LIB.impl("_capture_grad", _capture_grad, "CompositeExplicitAutograd")
torch.library.register_fake("lowrank_kernels::_capture_call", lib=_LIB)(
    lambda x, y, site: torch.empty((), dtype=torch.int64))
torch.library.register_fake("lowrank_kernels::_capture_grad", lib=_LIB)(lambda g, ticket: None)
_CALL = torch.ops.lowrank_kernels._capture_call.default
_GRAD = torch.ops.lowrank_kernels._capture_grad.default


try:  # ordered side effects: kept in the graph, in program order
    from torch._higher_order_ops.effects import EffectType, _register_effectful_op

    for _op in (_CALL, _GRAD):
        _register_effectful_op(_op, EffectType.ORDERED)
    AVAILABLE = True
except (ImportError, AttributeError):  # pragma: no cover - an older torch: eager calls
    AVAILABLE = False


def forget_tickets(capture):
    """Drop the tickets of capture's calls (its release)."""
    for ticket in [t for t, (c, _) in _TICKETS.items() if c is capture]:
        del _TICKETS[ticket]


class TracedCall:
    """A module's call while a capture records it in-graph (see the module doc). It holds
    its module weakly (it is kept per module); a deepcopy or pickle of the module made while
    it is set gets a TracedCall of its own, which records nothing."""

    def __init__(self, module):
        self.module_ref = weakref.ref(module)
        self.site = next(_NEXT_SITE)
        self.capture = None  # the active capture recording through this call
        _SITES[self.site] = self

    @staticmethod
    def of(module):
        call = _TRACED_CALLS.get(module)
        if call is None:
            call = _TRACED_CALLS[module] = TracedCall(module)
        return call

    def __deepcopy__(self, memo):
        return TracedCall(copy.deepcopy(self.module_ref(), memo))

    def __reduce__(self):
        return TracedCall, (self.module_ref(),)

    def __call__(self, *args, **kwargs):
        capture = self.capture
        if capture is not None and capture._weighting is not None:
            if torch.compiler.is_compiling():  # the weighted backward's own Function
                return self._eager(*args, **kwargs)
        return self._run(capture, args, kwargs)

    @torch._dynamo.disable(recursive=True)
    def _eager(self, *args, **kwargs):
        return self._run(self.capture, args, kwargs)

    def _run(self, capture, args, kwargs):
        module = self.module_ref()
        y = type(module)._call_impl(module, *args, **kwargs)
        if capture is None or not capture._active:  # paused (the fallback's torch.func)
            return y
        if capture._skip_record is module:  # its call went through the weighting
            capture._skip_record = None
            return y
        if not torch.is_grad_enabled() or (isinstance(y, torch.Tensor) and not y.requires_grad):
            return y
        if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor) or \
                not isinstance(y, torch.Tensor):  # what the eager hook does with it
            replaced = capture._eager_hooks[id(module)](module, args, kwargs, y)
            return y if replaced is None else replaced
        (x,), y = capture._broadcast(args, y)
        if torch.compiler.is_compiling():
            ticket = _CALL(x.detach(), y.detach(), self.site)
            y.register_hook(lambda g: _GRAD(g, ticket))
        else:
            call = self.record(x, y)
            if call is not None:
                y.register_hook(call.receiver(0))
        return y

    def record(self, x, y):
        """The capture's _Call for this call (None when the capture is paused or gone)."""
        capture = self.capture
        if capture is None or not capture._active:
            return None
        return capture._record_traced(self.module_ref(), x, y)
