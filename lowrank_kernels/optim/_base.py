"""The part FNGD, SENG and KFAC share: building from a model or (params, capture), the
per-layer blocks, the batched damped solve, and the guarded (momentum-)SGD update

    dir = d + wd·θ,   buf ← μ·buf + dir,   θ ← θ − lr·buf      (μ = 0: θ ← θ − lr·dir)

with d the method's preconditioned direction for θ. Safety: a tensor is usable when its
squared norm ‖·‖² is finite (accumulated in float32, float64 for float64 parameters): NaN,
Inf, and directions so large that ‖d‖² overflows (a loss scaled by 1e30 in float32) are
not. Where d is not usable or its layer's solve failed (woodbury_solve info ≠ 0), d is
replaced by the mean gradient ḡ (the plain (momentum-)SGD direction) and state["fallbacks"]
counts the parameter; where ḡ is not usable either, θ and its momentum buffer are left
unchanged and state["skipped"] counts it — the step cannot be taken. The checks run on the
device without synchronizing (torch.where), so nothing non-finite is ever written into the
weights.

Usage (FNGD, SENG, KFAC alike):

    opt = FNGD(model, lr=0.05, damping=0.5, steps_per_epoch=len(loader))
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()

Built from a model, the optimizer makes a Capture(model, loss_reduction=..., keep=True,
fallback=...) (fallback=True: layers Capture has no kernel for go through torch.func, with a
warning naming them and their cost) and
keeps its hooks on (opt.close() removes them). Built from parameters, it takes
capture=Capture(model) and enters it (do not wrap steps in your own `with capture:` unless
the capture has keep=True and step() runs inside the block). One forward and backward per
step: the capture records every forward run with gradients enabled until step() consumes
and releases the batch, so gradient accumulation over micro-batches is not supported, and
evaluation belongs under torch.no_grad(). loss_reduction says how the loss depends on the
per-sample losses ("mean", "sum", or s for loss = s·Σ_i ℓ_i, e.g. 1/(B·T) for a token mean).
State: per parameter only "momentum_buffer"; the methods' own state (step, counters,
coefficients, curvature, factors) sits under string keys of self.state, so state_dict()
saves it with torch.save and load_state_dict() resumes bit for bit.
"""
import torch

from lowrank_kernels import NonFiniteError

from . import _captured, _distributed


class GuardedOptimizer(torch.optim.Optimizer):
    """Base class: subclasses set self.blocks and implement _directions(...).

    Data parallel (see _distributed and the README's "Data-parallel training"): with
    distributed="auto" (default) a model wrapped in DistributedDataParallel (or a
    process_group given) under an initialized torch.distributed with R > 1 ranks trains in
    "exact" mode — the update is the single-process update on the global batch (the ranks'
    samples concatenated in rank order); "local" (opt-in) solves with each rank's own samples
    and averages the directions (an approximation); False: single-process behaviour."""

    def __init__(self, model_or_params, capture, defaults, *, loss_reduction, by_layer,
                 fallback=False, distributed="auto", process_group=None):
        params, self.capture, model, self._recording = _captured.start(
            model_or_params, capture, loss_reduction, fallback)
        super().__init__(params, defaults)
        self.data_parallel = _distributed.setup(model, distributed, process_group)
        self._local_batch = None
        if self.data_parallel is not None:
            self.data_parallel.skip_ddp_allreduce = self._skip_grad_allreduce
        mine = [p for g in self.param_groups for p in g["params"]]
        self.blocks = _captured.layer_blocks(self.capture, mine, by_layer)
        self._group = {id(p): g for g in self.param_groups for p in g["params"]}
        device = mine[0].device
        self.state["step"] = 0
        self.state["fallbacks"] = torch.zeros((), dtype=torch.int64, device=device)
        self.state["skipped"] = torch.zeros((), dtype=torch.int64, device=device)

    def close(self):
        """Remove the capture's hooks (the optimizer cannot step afterwards)."""
        self._recording.close()
        self.capture.release()

    def group_of(self, p):
        return self._group[id(p)]

    @torch.no_grad()
    def step(self, closure=None):
        """One step from the batch captured by the last forward and backward."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            per_param, B = _captured.contributions(self.capture)
            self._local_batch = B
            dp = self.data_parallel
            if dp is not None and not dp.ddp and not self._skip_grad_allreduce():
                dp.average_grads(p for g in self.param_groups for p in g["params"])
            try:
                if dp is None:
                    directions = self._directions(per_param, B)
                elif dp.mode == "local":
                    directions = self._averaged(self._directions(per_param, B))
                else:
                    directions, B = self._exact_directions(per_param, B)
            except NonFiniteError:  # strict mode: an op refused the batch's data
                directions = self._unusable(per_param)
            self._update(directions, B)
            self.state["step"] += 1
        finally:  # a step that raised still consumes its batch: the next one starts clean
            self.capture.release()
        return loss

    # ---- data parallel ---------------------------------------------------------------------
    def _skip_grad_allreduce(self):
        """Whether this step's backward may leave p.grad local (the optimizer communicates the
        direction itself): asked by DDP's comm hook during backward."""
        return False

    def _ordered_params(self):
        return [p for _, params in self.blocks for p in params]

    def _exact_directions(self, per_param, b):
        """(directions, B): the single-process math on the global batch's factors (gathered
        from every rank); identical on every rank."""
        factors, B, _ = self.data_parallel.gather_factors(per_param, self._ordered_params(), b)
        return self._directions(factors, B), B

    def _averaged(self, directions):
        """Local mode: each rank's directions averaged over the ranks (ok: all ranks ok)."""
        keys = [id(p) for g in self.param_groups for p in g["params"] if id(p) in directions]
        ds = [directions[k][0] for k in keys]
        oks = [directions[k][1].to(ds[0].dtype if ds else torch.float32).reshape(1)
               for k in keys]
        averaged = self.data_parallel.average(ds + oks)
        n = len(keys)
        return {k: (averaged[i], averaged[n + i][0] > 1 - 1e-6) for i, k in enumerate(keys)}

    def _unusable(self, per_param):
        """Directions for a batch the ops refused: none usable (every parameter falls back to
        ḡ, or is skipped where ḡ is not finite either)."""
        nan = torch.tensor(float("nan"))
        return {id(p): (nan.to(p.device).expand(p.shape),
                        torch.zeros((), dtype=torch.bool, device=p.device))
                for group in self.param_groups for p in group["params"] if p.grad is not None}

    def _mean_grad(self, p, B):
        """ḡ for p (the fallback direction), or None where the step has none (then every
        parameter with a .grad must get a direction, and a non-finite one is skipped)."""
        if self.data_parallel is not None:  # DDP-averaged p.grad: the local b undoes it
            B = self._local_batch
        return _captured.mean_grad(self.capture, p, B)

    def _update(self, directions, B):
        """directions: {id(p): (d, ok)} with ok a 0-dim bool tensor (missing: plain ḡ).
        d and ḡ are used where `_usable` (‖·‖² finite), see the module docstring."""
        fallbacks, skipped = self.state["fallbacks"], self.state["skipped"]
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = self._mean_grad(p, B)
                if g is None:  # no ḡ this step: a non-finite d skips the parameter
                    grad_ok = torch.zeros((), dtype=torch.bool, device=p.device)
                else:
                    grad_ok = _usable(g)
                if id(p) in directions:
                    d, ok = directions[id(p)]
                    ok = ok & _usable(d)
                    d = torch.where(ok, d.to(p.dtype),
                                    0 if g is None else torch.where(grad_ok, g, 0))
                    fallbacks = fallbacks + (~ok).long()
                    skip = ~ok & ~grad_ok
                else:
                    d = torch.where(grad_ok, g, 0)
                    skip = ~grad_ok
                skipped = skipped + skip.long()
                keep = (~skip).to(p.dtype)  # d is finite now: d·keep is 0 where skipped
                if wd != 0:
                    d = torch.add(d, p, alpha=wd)
                if mu != 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"]
                    buf.mul_(torch.where(skip, 1.0, mu).to(p.dtype)).addcmul_(d, keep)
                    d = buf
                p.addcmul_(d, keep, value=-lr)
        self.state["fallbacks"], self.state["skipped"] = fallbacks, skipped

    def _update_without_fallback(self, directions):
        """The update of `_update` for a step without ḡ, where every parameter with a .grad
        has its d in directions ({id(p): d}): a parameter whose d is not usable is skipped
        (counted in fallbacks and skipped). Per group: one batched norm and the foreach
        (momentum-)SGD update, as torch.optim.SGD's; a d that is not usable is masked (one
        where per parameter) unless all are usable, which a CPU step reads (a GPU step never
        reads it: it masks every d, without a sync)."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            ds = [directions[id(p)].to(p.dtype) for p in params]
            device = self.state["fallbacks"].device
            ok = torch.isfinite(torch.stack([n.to(device) for n in
                                             torch._foreach_norm([_accumulated(d) for d in ds])]))
            bad = (~ok).long().sum()
            self.state["fallbacks"] = self.state["fallbacks"] + bad
            self.state["skipped"] = self.state["skipped"] + bad
            if wd != 0:
                ds = torch._foreach_add(ds, params, alpha=wd)
            bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                    for p in params] if mu != 0 else None
            if ok.device.type == "cpu" and bool(ok.all()):  # no stream to block: SGD's update
                if mu != 0:
                    torch._foreach_mul_(bufs, mu)
                    torch._foreach_add_(bufs, ds)
                    ds = bufs
                torch._foreach_add_(params, ds, alpha=-lr)
                continue
            zero = torch.zeros((), dtype=ds[0].dtype)  # one 0-d CPU scalar, not one per d
            ds = [torch.where(k, d, zero) for k, d in zip(ok.unbind(), ds)]
            if mu != 0:
                torch._foreach_mul_(bufs, torch.where(ok, mu, 1.0).unbind())
                torch._foreach_add_(bufs, ds)
                ds = torch._foreach_mul(bufs, ok.to(params[0].dtype).unbind())
            torch._foreach_add_(params, ds, alpha=-lr)

    def block_dampings(self, dtype, device):
        """(L,): each block's damping λ (its first parameter's group)."""
        return torch.tensor([self.group_of(params[0])["damping"] for _, params in self.blocks],
                            dtype=dtype, device=device)


def _usable(t):
    """0-d bool: ‖t‖² finite, accumulated in float32 (float64 for float64): one reduction,
    no temporary of t's size."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return torch.isfinite(torch.linalg.vector_norm(t, dtype=acc))


def _accumulated(t):
    """t in the dtype `_usable` accumulates its norm in (float32, float64 for float64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
