"""TWA — Trainable Weight Averaging (Li et al., ICLR 2023 and the journal version).

The weights live in the span of k checkpoints, w = P α with P (D×k) orthonormal
(lowrank_kernels.subspace.build_subspace). A step moves the k coordinates with the projected
gradient and writes the weights back, each half one pass over P through a fused op:

    c = Pᵀ g                                   (subspace_project; all-reduced when P is sharded)
    b ← μ b + (c + λ α)      (b = c + λ α at the first step)
    α ← α − η (c + λ α + μ b  if nesterov else  b)
    w = P α                                    (subspace_expand; all-gathered when sharded)

With P orthonormal this is SGD (momentum μ, weight decay λ) on w restricted to span(P):
when span(P) holds every gradient (P = I, or any square orthogonal P) it is plain SGD.

The schedule of the paper: regular training while a CheckpointCollector samples the weights
(every epoch or every few iterations), then build_subspace and a short TWA phase with this
optimizer (usually a larger learning rate, decayed), starting from the checkpoints' average
(init='mean'); then recompute the BatchNorm statistics (lowrank_kernels.subspace.
recompute_batchnorm), since w moved without them.

Parallel scheme: with a sharded Subspace each rank holds s = ⌈D/world⌉ rows of P; the
k-vector Pᵀ g is all-reduced (sum of the row blocks) and the D-vector P α all-gathered, so
P's memory and the two passes over it are split evenly across ranks. Gradients must
already be identical across ranks (all-reduced by DDP, or computed on the same batch).
When P is on the CPU (offloaded) and the parameters on a GPU, P streams through in blocks
of `chunk_rows` rows.
"""
import torch
import torch.distributed as dist

from ..ops.subspace_project import subspace_expand, subspace_project
from ..subspace.checkpoints import Subspace, flatten_parameters


class TWA(torch.optim.Optimizer):
    """SGD on the coordinates α of w = P α (see the module docstring for the formulas).

    params: the model's parameters, in the order the checkpoints were flattened.
    subspace: a Subspace from build_subspace (or a D×k orthonormal tensor P).
    init: 'mean' (α₀ = the checkpoints' average coordinates), 'current' (α₀ = Pᵀ w, the
    projection of the current weights) or a k-vector; the weights are set to P α₀.
    backend: the ops' backend ('auto' by default)."""

    def __init__(self, params, subspace, lr, momentum=0.0, weight_decay=0.0, nesterov=False,
                 init="mean", chunk_rows=1 << 20, backend=None):
        if lr <= 0:
            raise ValueError(f"TWA: lr must be positive, got {lr}")
        if momentum < 0 or weight_decay < 0:
            raise ValueError(f"TWA: momentum and weight_decay must be ≥ 0, got {momentum} "
                             f"and {weight_decay}")
        if nesterov and momentum == 0:
            raise ValueError("TWA: nesterov needs momentum > 0")
        if isinstance(subspace, torch.Tensor):
            if subspace.dim() != 2:
                raise ValueError(f"TWA: subspace must be a Subspace or a D x k basis P, got "
                                 f"shape {tuple(subspace.shape)}")
            subspace = Subspace(P=subspace, mean_alpha=None, D=subspace.shape[0])
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      nesterov=nesterov))
        if len(self.param_groups) != 1:
            raise ValueError("TWA: params must form one parameter group (one α for all)")
        self.params = list(self.param_groups[0]["params"])
        D = sum(p.numel() for p in self.params)
        if D != subspace.D:
            raise ValueError(f"TWA: the parameters hold {D} values but the subspace was built "
                             f"for D = {subspace.D}")
        self.subspace, self.chunk_rows, self.backend = subspace, chunk_rows, backend
        self.device = self.params[0].device
        acc = torch.float64 if subspace.P.dtype == torch.float64 else torch.float32
        if isinstance(init, torch.Tensor):
            alpha = init.detach().to(self.device, acc).clone()
        elif init == "mean":
            if subspace.mean_alpha is None:
                raise ValueError("TWA: init='mean' needs a Subspace from build_subspace")
            alpha = subspace.mean_alpha.to(self.device, acc).clone()
        elif init == "current":
            alpha = self._project(flatten_parameters(self.params))
        else:
            raise ValueError(f"TWA: init must be 'mean', 'current' or a k-vector, got {init!r}")
        if alpha.shape != (subspace.k,):
            raise ValueError(f"TWA: init must have k = {subspace.k} coordinates, got "
                             f"{tuple(alpha.shape)}")
        self.state[self.params[0]]["alpha"] = alpha
        self._write_back(alpha)

    @property
    def alpha(self) -> torch.Tensor:
        """The current coordinates α (w = P α)."""
        return self.state[self.params[0]]["alpha"]

    def _blocks(self):
        """(row offset in this rank's block, P block on the parameters' device): P whole
        when it is there and small, else blocks of chunk_rows rows (copied when offloaded)."""
        P = self.subspace.P
        if P.device == self.device and P.shape[0] <= self.chunk_rows:
            yield 0, P
            return
        for r0 in range(0, P.shape[0], self.chunk_rows):
            yield r0, P[r0:r0 + self.chunk_rows].to(self.device, non_blocking=True)

    def _local_rows(self, flat):
        """This rank's rows of a flat D-vector, zero-padded to P's row count."""
        s = self.subspace
        local = flat[s.start:s.stop]
        pad = s.P.shape[0] - local.numel()
        return torch.nn.functional.pad(local, (0, pad)) if pad else local

    def _project(self, flat):
        """c = Pᵀ w over this rank's rows, summed across ranks."""
        local = self._local_rows(flat)
        if torch.float64 in (local.dtype, self.subspace.P.dtype):
            local = local.to(self.subspace.P.dtype)
        c = None
        for r0, block in self._blocks():
            part = subspace_project(block, local[r0:r0 + block.shape[0]], backend=self.backend)
            c = part if c is None else c + part
        if self.subspace.world > 1:
            dist.all_reduce(c, group=self.subspace.process_group)
        return c

    def _write_back(self, alpha):
        """w = P α: this rank's rows, gathered across ranks, copied into the parameters."""
        s = self.subspace
        dtype = self.params[0].dtype
        parts = [subspace_expand(block, alpha, backend=self.backend).to(dtype)
                 for _, block in self._blocks()]
        local = torch.cat(parts) if len(parts) > 1 else parts[0]
        if s.world > 1:
            gathered = [torch.empty_like(local) for _ in range(s.world)]
            dist.all_gather(gathered, local, group=s.process_group)
            flat = torch.cat(gathered)[: s.D]
        else:
            flat = local
        offset = 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        state = self.state[self.params[0]]
        alpha = state["alpha"]
        direction = self._project(flatten_parameters(grads)).to(alpha.dtype)
        if wd:
            direction = direction.add(alpha, alpha=wd)
        if mu:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = direction.clone()
            else:
                buf.mul_(mu).add_(direction)
            direction = direction.add(buf, alpha=mu) if group["nesterov"] else buf
        alpha.add_(direction, alpha=-lr)
        self._write_back(alpha)
        return loss
