"""Data parallelism for FNGD, SENG and KFAC on torch.distributed (DDP or a bare process group).

Each of the R ranks holds b_r samples of the global batch (B = Σ_r b_r, samples in rank
order). What the optimizers communicate, on top of DDP's own gradient all-reduce:

    gather_factors    the captured layer factors (A, E, X, idx, G: what Factors.state_dict
                      holds) of every rank — or, for SENG's sketched layers, their sketches —
                      padded to max b_r and all-gathered, one collective per dtype (+ one
                      small all_gather of the sizes and shapes, `meta_bytes`): every rank then
                      holds the global batch's Factors and runs the single-process math on them
    all_reduce_sum    a flat buffer (U_r c_r of FNGD's reuse phase and of SENG's sketched
                      layers, KFAC's factor sums)
    broadcast         KFAC's inverses, each computed by one rank

Bytes are counted per rank in the wrappers: an all-reduce or broadcast counts its buffer, an
all-gather its result (R × the padded local part); DDP's gradient buckets are counted by the
comm hook this module registers on a DistributedDataParallel model (`ddp_bytes`).

DDP averages p.grad over the ranks, (1/R) Σ_r s·Σ_{i∈r} ∇ℓ_i: with equal b_r that is the
global batch's gradient under the same loss_reduction, so ḡ = p.grad / (s·b) with the *local*
b (the optimizers use it). Without a DDP wrapper the optimizer averages p.grad itself (the
same all-reduce DDP would do). With unequal b_r that average is not the global batch's mean
gradient: FNGD's reuse steps and SENG's sketch exchange stay exact (each rank sends its share
(b_r/B)·ḡ_r, and its rows of c come from the sizes recorded by the last gather, `rows`); the
parts that read ḡ from p.grad (a fallback, SENG between refreshes, KFAC) need equal b_r.
"""
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from ..capture import Factors

MODES = ("exact", "local")


class DataParallel:
    """The optimizer's view of the process group: rank, world, mode, the byte counters and
    the collectives (all counted)."""

    def __init__(self, model, mode, group):
        self.mode, self.group = mode, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        self.bytes = 0  # this rank's bytes in the optimizer's own collectives, cumulative
        self.ddp_bytes = 0  # DDP's gradient buckets (counted by the comm hook), cumulative
        self.collectives = 0
        self.meta_bytes = 0  # the part of `bytes` that describes (sizes, shapes), cumulative
        self.skip_ddp_allreduce = None  # callable () -> bool, set by the optimizer
        self.hooked = False
        if self.ddp:
            try:
                model.register_comm_hook(self, _comm_hook)
                self.hooked = True
            except RuntimeError:  # the user registered their own hook: DDP reduces every step
                self.hooked = False

    def counters(self):
        """{'bytes', 'ddp_bytes', 'collectives', 'meta_bytes'} so far on this rank."""
        return {"bytes": self.bytes, "ddp_bytes": self.ddp_bytes,
                "collectives": self.collectives, "meta_bytes": self.meta_bytes}

    # ---- counted collectives -------------------------------------------------------------
    def all_reduce_sum(self, t):
        """t ← Σ_ranks t (in place); returns t."""
        self.bytes += t.numel() * t.element_size()
        self.collectives += 1
        dist.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t):
        """[t of rank 0, …, t of rank R−1] (equal shapes)."""
        out = [torch.empty_like(t) for _ in range(self.world)]
        self.bytes += self.world * t.numel() * t.element_size()
        self.collectives += 1
        dist.all_gather(out, t.contiguous(), group=self.group)
        return out

    def broadcast(self, t, src):
        self.bytes += t.numel() * t.element_size()
        self.collectives += 1
        dist.broadcast(t, src=dist.get_global_rank(self.group, src) if self.group else src,
                       group=self.group)
        return t

    # ---- what the optimizers need --------------------------------------------------------
    def average(self, tensors):
        """[(1/R) Σ_ranks t] for a list of tensors (see `sum`)."""
        return [t / self.world for t in self.sum(tensors)]

    def sum(self, tensors):
        """[Σ_ranks t] for a list of tensors, one flat all-reduce per dtype."""
        out = [None] * len(tensors)
        for dtype in dict.fromkeys(t.dtype for t in tensors):
            idx = [k for k, t in enumerate(tensors) if t.dtype == dtype]
            flat = self.all_reduce_sum(torch.cat([tensors[k].reshape(-1) for k in idx]))
            for k, piece in zip(idx, _split(flat, [tensors[k] for k in idx])):
                out[k] = piece
        return out

    def average_grads(self, params):
        """p.grad ← mean over ranks (what DDP does), for a model without a DDP wrapper."""
        params = [p for p in params if p.grad is not None]
        for p, g in zip(params, self.average([p.grad for p in params])):
            p.grad.copy_(g)

    def gather_factors(self, per_param, params, b):
        """({param: Factors of the global batch}, B, sizes): every rank's factors, samples in
        rank order. `params`: the parameters in an order that is the same on every rank."""
        mine = [p for p in params if p in per_param]
        states = [per_param[p].state_dict() for p in mine]
        tensors = [v for state in states for d in state for v in d.values()
                   if isinstance(v, torch.Tensor)]
        signature = (b, tuple(k for k, p in enumerate(params) if p in per_param),
                     tuple((tuple(t.shape[1:]), str(t.dtype)) for t in tensors))
        meta = [None] * self.world
        self.collectives += 1
        dist.all_gather_object(meta, signature, group=self.group)
        self.bytes += self.world * len(repr(signature))
        self.meta_bytes += self.world * len(repr(signature))
        sizes = [m[0] for m in meta]
        if any(m[1:] != signature[1:] for m in meta):
            raise ValueError(
                "distributed optimizer: the ranks captured different layers or per-sample "
                "shapes (tokens, image sizes) this step — exact mode concatenates the ranks' "
                "samples, so every rank must run the same layers on same-shaped samples")
        top = max(sizes)
        gathered = {}  # id(tensor) -> global tensor
        for dtype in dict.fromkeys(t.dtype for t in tensors):
            group = [t for t in tensors if t.dtype == dtype]
            padded = [torch.cat([t, t.new_zeros(top - t.shape[0], *t.shape[1:])])
                      if t.shape[0] < top else t for t in group]
            flat = torch.cat([t.reshape(-1) for t in padded])
            parts = [_split(f, padded) for f in self.all_gather(flat)]
            for k, t in enumerate(group):
                gathered[id(t)] = torch.cat([parts[r][k][:sizes[r]] for r in range(self.world)])
        backend = None
        out = {}
        for p, state in zip(mine, states):
            global_state = [{k: gathered[id(v)] if isinstance(v, torch.Tensor) else v
                             for k, v in d.items()} for d in state]
            out[p] = Factors.from_state_dict(global_state, backend=backend)
        return out, sum(sizes), sizes


    def rows(self, b, sizes, what):
        """(B, slice of this rank's rows in the global batch) from the ranks' local batch
        sizes `sizes` (recorded by an earlier gather_factors; None: all equal to b), without
        communicating. `what` names the step in the error raised where this rank holds b
        samples but sizes says otherwise."""
        sizes = [b] * self.world if sizes is None else list(sizes)
        if sizes[self.rank] != b:
            raise ValueError(
                f"{what} has {b} samples on rank {self.rank}, but the ranks' local batch sizes "
                f"recorded for it are {sizes} (ranks 0..{self.world - 1}): the ranks' batch "
                "sizes at a step position must repeat from epoch to epoch (a sampler's do), "
                "so that each rank knows its rows of the global batch without communicating")
        start = sum(sizes[:self.rank])
        return sum(sizes), slice(start, start + b)


def _split(flat, like):
    """The pieces of a flat buffer, reshaped like the tensors it was made of."""
    out, start = [], 0
    for t in like:
        out.append(flat[start:start + t.numel()].reshape(t.shape))
        start += t.numel()
    return out


def _comm_hook(state, bucket):
    """DDP's averaging all-reduce, counted; skipped (the local gradient kept) in the steps
    where the optimizer communicates the direction itself (FNGD's reuse phase)."""
    buffer = bucket.buffer()
    if state.skip_ddp_allreduce is not None and state.skip_ddp_allreduce():
        future = torch.futures.Future()
        future.set_result(buffer)
        return future
    state.ddp_bytes += buffer.numel() * buffer.element_size()
    return default_hooks.allreduce_hook(state.group, bucket)


def setup(model, distributed, process_group):
    """A DataParallel, or None for single-process training. distributed: "auto" (exact when
    torch.distributed is initialized with more than one rank and the model is wrapped in
    DistributedDataParallel or a process_group is given), "exact", "local", or False."""
    if distributed is False or distributed is None:
        return None
    if distributed not in ("auto", *MODES):
        raise ValueError(f"optimizer: distributed must be 'auto', 'exact', 'local' or False, "
                         f"got {distributed!r}")
    if not (dist.is_available() and dist.is_initialized()):
        if distributed == "auto":
            return None
        raise RuntimeError(f"optimizer: distributed={distributed!r} needs an initialized "
                           "torch.distributed process group (torchrun + init_process_group)")
    if isinstance(model, nn.parallel.DistributedDataParallel) and process_group is None:
        process_group = model.process_group
    if distributed == "auto":
        if not isinstance(model, nn.parallel.DistributedDataParallel) and process_group is None:
            return None
        distributed = "exact"
    if dist.get_world_size(process_group) == 1:
        return None
    return DataParallel(model, distributed, process_group)
