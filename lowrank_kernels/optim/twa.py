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

Safety: a step that cannot be taken is skipped — α, the momentum buffer and the weights are
left exactly as they were, state["skipped"] counts it, and the next batch trains normally.
A step cannot be taken when c = Pᵀ g is not finite (NaN or Inf gradients), when ‖c‖²
overflows the gradients' dtype (float32 for float32/float16/bfloat16 models: ‖c‖ ≳ 1.8e19,
e.g. a loss scaled by 1e30; float64 models: ‖c‖ ≳ 1.3e154), or when the new α or the new
weights P α are not finite (the weights' dtype overflows). The test runs on the device
(torch.where), without a host sync; in strict mode (lowrank_kernels.strict()) an op that
raises NonFiniteError makes the step a skip too. On a CPU with a float32 P, parameters
and gradients (the default backend, not sharded) the whole step is one fused kernel
(lowrank_kernels_twa::twa_step: c from each gradient where it is, w into a scratch vector and
its sum in the same pass, one copy per parameter when the step is taken; the flag is read in
host memory, which on a CPU is the device): the same formulas and skip rule in float32.
Every rank decides alike (c is all-reduced and w all-gathered before the test).
Frozen parameters (requires_grad=False) never move: their gradients are left out of c and
their rows of P α are not written (w_trainable = P_trainable α, the frozen values fixed).
Resume in PyTorch's usual order (model.load_state_dict, build TWA, opt.load_state_dict) is
bit for bit: load_state_dict restores α and the momentum buffer in their own dtype (not
cast to the parameters') and writes w = P α back, replacing what the constructor wrote.
"""
import math
import numbers

import torch
import torch.distributed as dist

import lowrank_kernels as _lk

from ..subspace.checkpoints import Subspace, flatten_parameters


def _real(name, value, *, positive=False):
    """value as a float: a finite real number (not a bool), > 0 when positive else ≥ 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"TWA: {name} must be a real number, got {type(value).__name__} "
                        f"{value!r}")
    value = float(value)
    if not math.isfinite(value) or (value <= 0 if positive else value < 0):
        want = "positive (finite, > 0)" if positive else "≥ 0 and finite"
        raise ValueError(f"TWA: {name} must be {want}, got {value!r}")
    return value


def _nonfinite_error():
    return getattr(_lk, "NonFiniteError", FloatingPointError)


class TWA(torch.optim.Optimizer):
    """SGD on the coordinates α of w = P α (see the module docstring for the formulas and
    the safety rules).

    params: the model's parameters, in the order the checkpoints were flattened (frozen
    ones included: they keep their values).
    subspace: a Subspace from build_subspace (or a D×k orthonormal floating tensor P).
    lr > 0, momentum ≥ 0, weight_decay ≥ 0: finite real numbers; nesterov: a bool.
    init: 'mean' (α₀ = the checkpoints' average coordinates), 'current' (α₀ = Pᵀ w, the
    projection of the current weights) or a k-vector; the weights are set to P α₀.
    chunk_rows: P's rows per block when P streams (a positive int).
    backend: the ops' backend (None: the default choice).
    State: state[params[0]] holds "alpha" and "momentum_buffer" (in the accumulation dtype:
    float64 when P is float64, else float32); state["step"] counts step() calls and
    state["skipped"] (an int64 tensor on the parameters' device) the skipped steps."""

    def __init__(self, params, subspace, lr, momentum=0.0, weight_decay=0.0, nesterov=False,
                 init="mean", chunk_rows=1 << 20, backend=None):
        lr = _real("lr", lr, positive=True)
        momentum = _real("momentum", momentum)
        weight_decay = _real("weight_decay", weight_decay)
        if not isinstance(nesterov, bool):
            raise TypeError(f"TWA: nesterov must be a bool, got {type(nesterov).__name__} "
                            f"{nesterov!r}")
        if nesterov and momentum == 0:
            raise ValueError("TWA: nesterov needs momentum > 0")
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ValueError(f"TWA: chunk_rows must be a positive int, got {chunk_rows!r}")
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"TWA: backend must be None or a backend name (str), got "
                            f"{type(backend).__name__}")
        if isinstance(subspace, torch.Tensor):
            if subspace.dim() != 2:
                raise ValueError(f"TWA: subspace must be a Subspace or a D x k basis P, got "
                                 f"shape {tuple(subspace.shape)}")
            subspace = Subspace(P=subspace, mean_alpha=None, D=subspace.shape[0])
        elif not isinstance(subspace, Subspace):
            raise TypeError(f"TWA: subspace must be a Subspace (build_subspace) or a D x k "
                            f"tensor P, got {type(subspace).__name__}")
        P = subspace.P
        if not isinstance(P, torch.Tensor) or not P.is_floating_point() or P.dim() != 2:
            raise TypeError("TWA: subspace.P must be a 2-D floating-point tensor")
        if P.shape[1] < 1:
            raise ValueError(f"TWA: the subspace must have k >= 1 directions, got P of shape "
                             f"{tuple(P.shape)}")
        if not bool(torch.isfinite(P).all()):
            raise ValueError("TWA: subspace.P contains non-finite values (NaN or Inf)")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      nesterov=nesterov))
        if len(self.param_groups) != 1:
            raise ValueError("TWA: params must form one parameter group (one α for all)")
        self.params = list(self.param_groups[0]["params"])
        for i, p in enumerate(self.params):
            if not p.is_floating_point():
                raise TypeError(f"TWA: params[{i}] must be a floating-point tensor, got "
                                f"{p.dtype}")
        D = sum(p.numel() for p in self.params)
        if D != subspace.D:
            raise ValueError(f"TWA: the parameters hold {D} values but the subspace was built "
                             f"for D = {subspace.D}")
        self.subspace, self.chunk_rows, self.backend = subspace, chunk_rows, backend
        self.device = self.params[0].device
        self.acc = torch.float64 if P.dtype == torch.float64 else torch.float32
        if isinstance(init, torch.Tensor):
            if not init.is_floating_point():
                raise TypeError(f"TWA: init must be a floating-point k-vector, got {init.dtype}")
            alpha = init.detach().to(self.device, self.acc).clone()
        elif init == "mean":
            if subspace.mean_alpha is None:
                raise ValueError("TWA: init='mean' needs a Subspace from build_subspace")
            alpha = subspace.mean_alpha.to(self.device, self.acc).clone()
        elif init == "current":
            alpha = self._project(flatten_parameters(self.params)).to(self.acc)
        else:
            raise ValueError(f"TWA: init must be 'mean', 'current' or a k-vector, got {init!r}")
        if alpha.shape != (subspace.k,):
            raise ValueError(f"TWA: init must have k = {subspace.k} coordinates, got "
                             f"{tuple(alpha.shape)}")
        if not bool(torch.isfinite(alpha).all()):
            source = init if isinstance(init, str) else "a tensor"
            raise ValueError(f"TWA: the initial coordinates α₀ (init={source!r}) contain "
                             f"non-finite values (NaN or Inf)")
        self.state[self.params[0]]["alpha"] = alpha
        self._fused = self._fused_step()
        self.state["step"] = 0
        self.state["skipped"] = torch.zeros((), dtype=torch.int64, device=self.device)
        self._write_back(self._expand(alpha))

    def _fused_step(self):
        """lowrank_kernels_twa::twa_step (csrc/subspace_project.cpp), the whole step as one CPU
        kernel, where it takes this setup: a float32 P whole on the CPU and not sharded, the
        default backend, the extension built (step() checks the parameters and gradients:
        contiguous float32); else None."""
        s, P = self.subspace, self.subspace.P
        if (self.device.type != "cpu" or P.device.type != "cpu" or P.dtype != torch.float32
                or s.world != 1 or P.shape[0] != s.D or self.backend is not None):
            return None
        try:
            return torch.ops.lowrank_kernels_twa.twa_step.default
        except (AttributeError, RuntimeError):  # no native extension
            return None

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
        """c = Pᵀ w over this rank's rows, summed across ranks. An op that refuses a
        non-finite input (strict mode) gives a NaN part instead of raising, so that every
        rank still joins the all-reduce and all of them see the NaN."""
        local = self._local_rows(flat)
        if torch.float64 in (local.dtype, self.subspace.P.dtype):
            local = local.to(self.subspace.P.dtype)
        c = None
        for r0, block in self._blocks():
            try:
                part = _lk.subspace_project(block, local[r0:r0 + block.shape[0]],
                                            backend=self.backend)
            except _nonfinite_error():
                part = torch.full((block.shape[1],), float("nan"), dtype=block.dtype,
                                  device=self.device)
            c = part if c is None else c + part
        if self.subspace.world > 1:
            dist.all_reduce(c, group=self.subspace.process_group)
        return c

    def _expand(self, alpha):
        """w = P α (the whole D-vector, in the parameters' dtype): this rank's rows,
        gathered across ranks (NaN rows where strict mode refused a non-finite α)."""
        s = self.subspace
        dtype = self.params[0].dtype
        parts = []
        for _, block in self._blocks():
            try:
                part = _lk.subspace_expand(block, alpha, backend=self.backend)
            except _nonfinite_error():
                part = torch.full((block.shape[0],), float("nan"), dtype=block.dtype,
                                  device=self.device)
            parts.append(part.to(dtype))
        local = torch.cat(parts) if len(parts) > 1 else parts[0]
        if s.world > 1:
            gathered = [torch.empty_like(local) for _ in range(s.world)]
            dist.all_gather(gathered, local, group=s.process_group)
            return torch.cat(gathered)[: s.D]
        return local

    @torch.no_grad()
    def _write_back(self, flat, ok=None):
        """Copy w (flat) into the trainable parameters (frozen ones keep their values);
        with ok (a 0-dim bool tensor) only where ok holds, else leave them as they are."""
        offset = 0
        for p in self.params:
            n = p.numel()
            if p.requires_grad:
                new = flat[offset:offset + n].view_as(p)
                if ok is None:
                    p.copy_(new)
                else:  # one pass over p, no temporary
                    torch.where(ok, new, p, out=p)
            offset += n

    def load_state_dict(self, state_dict):
        """Optimizer.load_state_dict, then α and the momentum buffer restored in their own
        dtype (torch casts per-parameter state to the parameter's dtype, which would round a
        float64 α for float32 weights) and the weights set to P α: resuming continues bit
        for bit whatever the constructor wrote."""
        saved = {key: value for key, value in state_dict["state"].get(0, {}).items()
                 if key in ("alpha", "momentum_buffer")}
        if "alpha" not in saved:
            raise ValueError("TWA.load_state_dict: the state_dict has no 'alpha' (not saved "
                             "from a TWA optimizer)")
        if saved["alpha"].shape != (self.subspace.k,):
            raise ValueError(f"TWA.load_state_dict: the saved alpha has shape "
                             f"{tuple(saved['alpha'].shape)}, this subspace has k = "
                             f"{self.subspace.k}")
        super().load_state_dict(state_dict)
        state = self.state[self.params[0]]
        for key, value in saved.items():
            state[key] = value.detach().to(self.device, self.acc).clone()
        self.state["skipped"] = torch.as_tensor(self.state.get("skipped", 0),
                                                dtype=torch.int64, device=self.device).clone()
        self.state.setdefault("step", 0)
        self._write_back(self._expand(state["alpha"]))

    @torch.no_grad()
    def step(self, closure=None):
        """One step from the parameters' .grad (frozen parameters and missing gradients count
        as zero); skipped, on the device, when it cannot be taken (module docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        state = self.state[self.params[0]]
        alpha = state["alpha"]
        if self._fused is not None and not torch.compiler.is_compiling():  # (no fake kernel)
            grads = [p.grad if p.requires_grad else None for p in self.params]
            if all(t is None or (t.dtype == torch.float32 and t.is_contiguous())
                   for t in (*self.params, *grads)):
                if mu and "momentum_buffer" not in state:  # a zero buffer, as below
                    state["momentum_buffer"] = torch.zeros_like(alpha)
                buf = state["momentum_buffer"] if mu else alpha.new_empty(0)
                self.state["skipped"] = self._fused(self.subspace.P, self.params, grads, alpha,
                                                    buf, self.state["skipped"], lr, mu, wd,
                                                    group["nesterov"])
                self.state["step"] += 1
                return loss
        grads = [p.grad if p.grad is not None and p.requires_grad else torch.zeros_like(p)
                 for p in self.params]
        # One parameter: its gradient as it is (only read), not a copy.
        flat = grads[0].detach().reshape(-1) if len(grads) == 1 else flatten_parameters(grads)
        c = self._project(flat).to(alpha.dtype)
        # ‖c‖² in the gradients' dtype (float32 at least): it overflows for a loss × 1e30
        norm_dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
        norm2 = c.to(norm_dtype).square().sum()
        direction = c.add(alpha, alpha=wd) if wd else c
        buf = new_buf = None
        if mu:
            buf = state.get("momentum_buffer")
            if buf is None:  # μ·0 + d = d exactly: the first step is SGD's
                buf = state["momentum_buffer"] = torch.zeros_like(alpha)
            new_buf = buf.mul(mu).add_(direction)
            direction = direction.add(new_buf, alpha=mu) if group["nesterov"] else new_buf
        new_alpha = alpha.add(direction, alpha=-lr)
        w = self._expand(new_alpha)
        wide = torch.float64 if w.dtype == torch.float64 else torch.float32
        # One test on the device: ‖c‖², Σ α and Σ w finite (a NaN/Inf in c, α or w makes its
        # sum non-finite), stacked in the widest of their dtypes.
        ok = torch.isfinite(torch.stack((norm2, new_alpha.sum(), w.sum(dtype=wide)))).all()
        torch.where(ok, new_alpha, alpha, out=alpha)
        if mu:
            torch.where(ok, new_buf, buf, out=buf)
        self._write_back(w, ok)
        self.state["skipped"] = self.state["skipped"] + ok.logical_not()
        self.state["step"] += 1
        return loss
