"""The TWA subspace: an orthonormal basis P (D×k) of the span of k checkpoints.

Checkpoints are flat parameter vectors (D), state_dicts (their parameters, in the model's
order) or collected during training by `CheckpointCollector`. P is stored in float32 or the
parameters' dtype, on the GPU or offloaded to the CPU (pinned when a GPU is there). With
`shard=True` under torch.distributed each rank keeps only its block of rows of P (the TWA
paper's parallel scheme): rank r holds rows [r·s, (r+1)·s), s = ⌈D / world⌉, padded with zero
rows to s so that the ranks' blocks have one shape.
"""
import dataclasses

import torch
import torch.distributed as dist

from ..sketch import orthonormalize
from . import _args


@dataclasses.dataclass
class Subspace:
    """P: this rank's rows [start, stop) of the orthonormal basis (padded to `rows` rows);
    mean_alpha = Pᵀ c̄, the coordinates of the checkpoints' average (P mean_alpha = c̄);
    D: the number of parameters; world: ranks sharing P (1: not sharded)."""
    P: torch.Tensor
    mean_alpha: torch.Tensor
    D: int
    start: int = 0
    stop: int | None = None
    world: int = 1
    process_group: object = None

    def __post_init__(self):
        if self.stop is None:
            self.stop = self.D

    @property
    def k(self) -> int:
        return self.P.shape[1]


def flatten_parameters(params) -> torch.Tensor:
    """The flat vector w = [vec(p₁); vec(p₂); …] of an iterable of tensors (detached)."""
    return torch.cat([p.detach().reshape(-1) for p in params])


def _as_flat(checkpoint, names, index):
    if isinstance(checkpoint, torch.Tensor):
        if checkpoint.dim() != 1:
            raise ValueError(f"build_subspace: checkpoints[{index}] must be a flat (1-D) "
                             f"parameter vector, got shape {tuple(checkpoint.shape)}")
        return checkpoint
    if isinstance(checkpoint, dict):
        if names is None:
            raise ValueError("build_subspace: checkpoints given as state_dicts need `model` "
                             "(its named_parameters set which entries and in which order)")
        missing = [n for n in names if n not in checkpoint]
        if missing:
            raise KeyError(f"build_subspace: checkpoints[{index}] lacks parameters {missing[:3]}")
        return flatten_parameters(checkpoint[n] for n in names)
    raise TypeError(f"build_subspace: checkpoints[{index}] must be a flat tensor or a "
                    f"state_dict, got {type(checkpoint).__name__}")


def _shard_rows(D, process_group):
    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    rows = -(-D // world)
    return rank * rows, min((rank + 1) * rows, D), rows, world


def _orthonormalize_sharded(C, process_group):
    """Q = C V Λ^{-1/2} from the all-reduced float64 Gram CᵀC = V Λ Vᵀ (directions with
    λ ≤ k·ε·λ_max dropped), done twice (SVQB, Stathopoulos & Wu) — the distributed
    orthonormalization of row-sharded columns: only k×k matrices cross the network."""
    Q = C.double()
    for _ in range(2):
        G = Q.T @ Q
        dist.all_reduce(G, group=process_group)
        lam, V = torch.linalg.eigh(G)
        keep = lam > lam.max() * Q.shape[1] * torch.finfo(torch.float64).eps
        Q = Q @ (V[:, keep] / lam[keep].sqrt())
    return Q


def build_subspace(checkpoints, *, model=None, dtype=torch.float32, device=None,
                   pin_memory=False, shard=False, process_group=None) -> Subspace:
    """An orthonormal basis P of span{c₁, …, c_k} (Cholesky-QR2 with a Householder fallback
    through lowrank_kernels.sketch.orthonormalize; with shard=True, a row-sharded
    Gram-eigen orthonormalization whose k×k Grams are all-reduced) and the coordinates
    mean_alpha = Pᵀ c̄ of the average checkpoint.

    checkpoints: flat parameter vectors (D) or state_dicts (then `model` gives the parameter
    names and order). dtype: P's dtype. device: where P lives (default: the checkpoints'
    device; 'cpu' offloads, pinned when pin_memory and a GPU is available)."""
    op = "build_subspace"
    _args.float_dtype(op, "dtype", dtype)
    for name, flag in (("shard", shard), ("pin_memory", pin_memory)):
        if not isinstance(flag, bool):
            raise TypeError(f"{op}: {name} must be a bool, got {type(flag).__name__} {flag!r}")
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise ValueError("build_subspace: checkpoints must hold at least one checkpoint")
    names = [n for n, _ in model.named_parameters()] if model is not None else None
    flats = [_as_flat(c, names, i) for i, c in enumerate(checkpoints)]
    D = flats[0].numel()
    for i, f in enumerate(flats):
        if not f.is_floating_point():
            raise TypeError(f"build_subspace: checkpoints[{i}] must be floating point, got "
                            f"{f.dtype}")
        if not bool(torch.isfinite(f).all()):
            raise ValueError(f"build_subspace: checkpoints[{i}] contains non-finite values "
                             f"(NaN or Inf)")
        if f.numel() != D:
            raise ValueError(f"build_subspace: checkpoints[{i}] has {f.numel()} parameters, "
                             f"checkpoints[0] has {D}")
    device = torch.device(device) if device is not None else flats[0].device
    work_device = flats[0].device
    if shard and dist.is_available() and dist.is_initialized():
        start, stop, rows, world = _shard_rows(D, process_group)
        C = torch.stack([f[start:stop].to(work_device) for f in flats], dim=1)
        Q = _orthonormalize_sharded(C, process_group)
        mean_alpha = Q.T @ C.double().mean(dim=1)
        dist.all_reduce(mean_alpha, group=process_group)
        P = torch.zeros(rows, Q.shape[1], dtype=dtype, device=work_device)
        P[: stop - start] = Q.to(dtype)
    else:
        start, stop, world = 0, D, 1
        C = torch.stack([f.to(work_device) for f in flats], dim=1)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        P = orthonormalize(C.to(acc))
        mean_alpha = (P.double().T @ C.double().mean(dim=1))
        P = P.to(dtype)
    P = P.to(device)
    if pin_memory and P.device.type == "cpu" and torch.cuda.is_available():
        P = P.pin_memory()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return Subspace(P=P, mean_alpha=mean_alpha.to(acc), D=D, start=start, stop=stop,
                    world=world, process_group=process_group if world > 1 else None)


class CheckpointCollector:
    """Collects flat copies of the model's parameters every `every` calls of step() during
    the regular-training phase (at most max_checkpoints, the oldest dropped), stored in
    `dtype` on `device` (default CPU: the GPU keeps only the model)."""

    def __init__(self, model, every=1, max_checkpoints=None, dtype=torch.float32,
                 device="cpu"):
        op = "CheckpointCollector"
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{op}: model must be a torch.nn.Module, got {type(model).__name__}")
        _args.positive_int(op, "every", every)
        if max_checkpoints is not None:
            _args.positive_int(op, "max_checkpoints", max_checkpoints)
        _args.float_dtype(op, "dtype", dtype)
        self.params = [p for p in model.parameters()]
        self.every, self.max_checkpoints = every, max_checkpoints
        self.dtype, self.device = dtype, torch.device(device)
        self.checkpoints: list[torch.Tensor] = []
        self.calls = 0

    def step(self):
        self.calls += 1
        if self.calls % self.every:
            return
        self.checkpoints.append(flatten_parameters(self.params).to(self.device, self.dtype))
        if self.max_checkpoints is not None and len(self.checkpoints) > self.max_checkpoints:
            self.checkpoints.pop(0)
