"""Parameters used directly in a module's forward (a ViT's cls_token and pos_embed, ConvNeXt's
layer-scale gamma, learned position tables): their per-sample gradient is the batch-row of
the gradient at their use.

While the owning module's forward runs, a TorchFunctionMode follows each such parameter p
through the ops that only reshape or cast it (q = chain(p): expand, reshape, [...], .to, …).
At a use — a broadcasting op that meets batched data (add, mul, cat, matmul, …) — q is given
an explicit batch dim: q_b = q[None…].expand(B, …) when q broadcasts over the batch, or a
view of q when q already has B rows (cls_token.expand(B, …)). The op runs on q_b (the same
values, so the forward is unchanged) and the gradient G reaching q_b has one row per
sample. Then

    g_i = vjp_chain(G_i)           (q broadcast: sample i's row of G, reshaped to q)
    g_i = vjp_chain(onehot_i ⊙ G)  (q with B rows: sample i reads row i only)

exactly (torch.func.vjp of the recorded chain). Any other op that meets batched data with p
(F.linear(x, p), a convolution, …) raises: its per-sample split is not a batch-row.
"""
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._kinds import DenseFactors

T = torch.Tensor
# Ops whose result row i reads only row i of each batched operand, where a batch dim of
# size 1 (or none) broadcasts: a parameter operand gets an explicit batch dim of B rows.
BROADCASTING = {
    torch.add, torch.sub, torch.mul, torch.div, torch.cat, torch.concat, torch.stack,
    torch.where, torch.addcmul, torch.matmul, torch.maximum, torch.minimum,
    T.add, T.add_, T.sub, T.sub_, T.mul, T.mul_, T.div, T.div_, T.addcmul, T.addcmul_,
    T.__add__, T.__radd__, T.__iadd__, T.__sub__, T.__rsub__, T.__isub__, T.__mul__,
    T.__rmul__, T.__imul__, T.__truediv__, T.__rtruediv__, T.__itruediv__, T.__matmul__,
    T.__rmatmul__, T.matmul, T.expand_as, T.where, T.maximum, T.minimum,
}


class DirectUseHandler:
    """One use of a directly used parameter: p, the chain p -> q, and how q met the batch."""

    def __init__(self, name, param, steps, q_shape, has_rows):
        self.name, self.param, self.steps = name, param, steps
        self.q_shape, self.has_rows = q_shape, has_rows

    def contributions(self, saved, G, backend):
        B = G.shape[0]
        p = self.param
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        if self.has_rows:  # q (B, …): sample i's cotangent is row i of G, zero elsewhere
            eye = torch.eye(B, dtype=G.dtype, device=G.device)
            cots = eye.reshape(B, B, *([1] * (G.dim() - 1))) * G[None]
            cots = cots.reshape(B, *self.q_shape)
        else:  # q broadcast over the batch: sample i's cotangent is G_i
            cots = G.reshape(B, *self.q_shape)
        if self.steps:
            _, vjp = torch.func.vjp(self._replay, p.detach().to(cots.dtype))
            per_sample = torch.func.vmap(vjp)(cots)[0]
        else:
            per_sample = cots
        return [(p, DenseFactors(per_sample.reshape(B, *p.shape).to(dtype)))]

    def _replay(self, x):
        for func, flat, spec, position in self.steps:
            flat = list(flat)
            flat[position] = x
            args, kwargs = tree_unflatten(flat, spec)
            x = func(*args, **kwargs)
        return x


class DirectUses(TorchFunctionMode):
    """Follows `params` ({name: p}) through one forward of their owner (see the module doc);
    `record(handler, q_b)` is the capture's: it hooks the gradient reaching q_b."""

    def __init__(self, owner, params, batch_size, record):
        super().__init__()
        self.owner, self.batch_size, self.record = owner, batch_size, record
        # id(tensor) -> (tensor, parameter name, parameter, chain steps)
        self.tracked = {id(p): (p, n, p, ()) for n, p in params.items()}

    def _lookup(self, a):
        entry = self.tracked.get(id(a)) if isinstance(a, torch.Tensor) else None
        return entry if entry is not None and entry[0] is a else None

    # Eager under torch.compile: traced, its lookups by id() would guard on the identity of
    # every tensor reaching an op, and the owner's frames would recompile on every call. So
    # the owner's forward runs eagerly while captured; the rest of the model compiles.
    @torch._dynamo.disable(recursive=True)
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, spec = tree_flatten((args, kwargs))
        hits = [k for k, a in enumerate(flat) if self._lookup(a) is not None]
        if not hits:
            return func(*args, **kwargs)
        data = [a for k, a in enumerate(flat) if k not in hits and isinstance(a, torch.Tensor)
                and a.dim() >= 1]
        if not data:  # reshapes / casts of p (or metadata): follow the chain
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor) and len(hits) == 1 and out.requires_grad:
                _, name, p, steps = self._lookup(flat[hits[0]])
                self.tracked[id(out)] = (out, name, p, steps + ((func, flat, spec, hits[0]),))
            return out
        names = sorted({self._lookup(flat[k])[1] for k in hits})
        if func not in BROADCASTING:
            raise TypeError(
                f"capture: parameter(s) {', '.join(names)} of module '{self.owner}' meet the "
                f"batch in {getattr(func, '__name__', func)}, whose per-sample split the "
                "capture does not know (it follows direct uses through broadcasting ops: "
                "add, mul, cat, matmul, …); put the parameter in a supported layer, or use "
                "Capture(model, fallback=True) on a module that owns it")
        B = self.batch_size() or data[0].shape[0]
        rank = max(a.dim() for a in data)
        flat = list(flat)
        for k in hits:
            q = flat[k]
            _, name, p, steps = self._lookup(q)
            q_v = q.reshape((1,) * max(0, rank - q.dim()) + tuple(q.shape))
            if q_v.shape[0] == 1 and B != 1:
                q_b, has_rows = q_v.expand(B, *q_v.shape[1:]), False
            elif q_v.shape[0] == B:
                q_b, has_rows = q_v.view(q_v.shape), True
            else:
                raise ValueError(
                    f"capture: parameter '{name}' of module '{self.owner}' meets a batch of {B} "
                    f"in {getattr(func, '__name__', func)} with a leading dim of "
                    f"{q_v.shape[0]} (neither 1, broadcast over the batch, nor {B} rows)")
            self.record(DirectUseHandler(name, p, steps, tuple(q.shape), has_rows), q_b)
            flat[k] = q_b
        args, kwargs = tree_unflatten(flat, spec)
        return func(*args, **kwargs)
