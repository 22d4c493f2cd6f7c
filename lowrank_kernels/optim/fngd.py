"""FNGD — Fast Natural Gradient Descent (arXiv 2403.03473)."""
import torch
from torch import nn

from .. import natural_gradient
from ._base import GuardedOptimizer


class FNGD(GuardedOptimizer):
    """FNGD(model, lr, damping=1e-3, *, steps_per_epoch, momentum=0, weight_decay=0,
            blocks="layer", reuse="mean", refresh_every=None, loss_reduction="mean",
            reuse_via_backward=False)
    FNGD(params, lr, ..., capture=Capture(model))

    Natural gradient as a weighted sum of the per-sample gradients g_i = ∇ℓ_i (U = [g_i]):

        d = (F + λI)⁻¹ ḡ = U c,   c = (K + λB·I)⁻¹ 1,   K = UᵀU,  F = UUᵀ/B,  ḡ = U1/B

    (Sherman–Morrison–Woodbury), per layer (blocks="layer": F block-diagonal over modules,
    each module's weight and bias form one block with its own c) or for the whole model
    (blocks="model": one K summed over all parameters, one c). The update is the
    (momentum-)SGD update of d: θ ← θ − lr·buf, buf ← μ·buf + d + wd·θ (see _base).

    Coefficients. During the first epoch (`steps_per_epoch` steps) c is computed from each
    batch's Gram K with `woodbury_solve`. Afterwards the coefficients are reused, so a step
    costs one weighted sum U c per parameter and no Gram and no solve — about a first-order
    step. Why reuse is sound, per the paper (arXiv 2403.03473): NGD is exactly a weighted
    sum of per-sample gradients, the weights c only weigh the samples of a batch against each
    other (the gradients themselves are always fresh), and its experiments found that the
    coefficients can be "shared across epochs without affecting the empirical performance",
    which removes every inverse after epoch one. What is reused is the normalized weight
    w = B·c (w ≡ 1/λ when K = 0: the mean gradient scaled by 1/λ), so batches of different
    sizes are comparable:
      reuse="mean" (default): w̄_k = the mean of w_k over the first-epoch batches that have
        a k-th sample (a smaller last batch contributes to its first positions only); a batch
        of size b gets c = w̄[:b] / b (positions never seen get the mean of all w̄). With a
        shuffling loader position k is a random sample, so w̄ is close to a constant: the
        reused direction is then close to the mean gradient scaled by mean(w) — the
        curvature information that survives is its overall scale (a per-layer step size
        per block when blocks="layer").
      reuse="per_step": keep the w of every first-epoch step and give step t of a later
        epoch the w of step t mod steps_per_epoch — the paper's sharing when the loader does
        not shuffle (then the same samples meet the same coefficients); positions beyond a
        stored batch's size get that batch's mean weight.
    refresh_every=N recomputes (and re-averages) the coefficients during epochs 0, N, 2N, …;
    None (default) computes them in the first epoch only.

    A failed solve (indefinite or non-finite K) or a non-finite direction falls back to the
    mean gradient for that layer's parameters (state["fallbacks"]); a failed batch does not
    enter the average. The capture records every forward run with gradients enabled; step()
    consumes the batch and releases it (evaluate under torch.no_grad()).

    reuse_via_backward=True (needs blocks="model"): in a reuse step the direction comes out
    of the normal backward itself. With loss = s·Σ_i ℓ_i (s = 1/B for "mean", 1 for "sum",
    the number s otherwise) the gradient reaching row i of the model output y is s·∂ℓ_i/∂y_i;
    a tensor hook registered on y during the forward multiplies row i by w_i = c_i / s
    (B·c_i under "mean"), so autograd leaves

        p.grad = Σ_i c_i ∇_p ℓ_i = (U c)_p      for every parameter p

    with no weighted-sum op, and the capture's hooks are paused for that forward (nothing is
    recorded). Forwards under torch.no_grad() or inside opt.capture.paused() are untouched.
    Exact when (1) sample i's loss depends on θ only through row i of the output (dim 0 =
    batch of a tensor output) and (2) samples do not interact in the forward. (2) fails for
    normalization over the batch: when a module subclassing nn.modules.batchnorm._NormBase
    (BatchNorm, and conservatively InstanceNorm) is in train mode at the forward, that step
    takes the weighted-sum path instead (capture on, as without the option) and
    state["weighted_sum_steps"] counts it. Other batch-mixing operations are not detected:
    do not use the option with them. Every model parameter's .grad holds U c after backward
    (also those outside this optimizer). Safety: ḡ is not computed in such a step, so the
    fallback differs — when no first-epoch solve succeeded (the weighted-sum path's fallback
    to ḡ) the weights c_i = 1/B give ḡ through the same backward (counted per parameter in
    state["fallbacks"]); a parameter whose U c is not finite is skipped (weights and momentum
    unchanged) and counted in state["fallbacks"] and state["skipped"].
    """

    def __init__(self, model_or_params, lr, damping=1e-3, *, steps_per_epoch, momentum=0.0,
                 weight_decay=0.0, blocks="layer", reuse="mean", refresh_every=None,
                 loss_reduction="mean", capture=None, reuse_via_backward=False, fallback=False,
                 distributed="auto", process_group=None):
        if not lr > 0:
            raise ValueError(f"FNGD: lr must be > 0, got {lr}")
        if not damping > 0:
            raise ValueError(f"FNGD: damping must be > 0, got {damping}")
        if not (isinstance(steps_per_epoch, int) and steps_per_epoch >= 1):
            raise ValueError(f"FNGD: steps_per_epoch must be an int >= 1, got {steps_per_epoch!r}")
        if blocks not in ("layer", "model"):
            raise ValueError(f"FNGD: blocks must be 'layer' or 'model', got {blocks!r}")
        if reuse not in ("mean", "per_step"):
            raise ValueError(f"FNGD: reuse must be 'mean' or 'per_step', got {reuse!r}")
        if refresh_every is not None and not (isinstance(refresh_every, int)
                                              and refresh_every >= 1):
            raise ValueError(f"FNGD: refresh_every must be None or an int >= 1, got "
                             f"{refresh_every!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"FNGD: momentum must be in [0, 1), got {momentum}")
        if reuse_via_backward not in (False, True):
            raise ValueError(f"FNGD: reuse_via_backward must be a bool, got "
                             f"{reuse_via_backward!r}")
        if reuse_via_backward and blocks != "model":
            raise ValueError("FNGD: reuse_via_backward=True needs blocks='model' (one "
                             f"coefficient vector for all parameters), got blocks={blocks!r}")
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        super().__init__(model_or_params, capture, defaults, loss_reduction=loss_reduction,
                         by_layer=blocks == "layer", fallback=fallback,
                         distributed=distributed, process_group=process_group)
        self.steps_per_epoch, self.reuse, self.refresh_every = steps_per_epoch, reuse, refresh_every
        self.state["coefficients"] = {}
        self._reused_cache = {}  # (block, B, position) -> (c, ok): derived from the state
        self.reuse_via_backward = reuse_via_backward
        self.state["weighted_sum_steps"] = 0
        self._pending = None  # (step, B, ok) of a forward whose output gradient is scaled
        self._paused = None  # the capture's paused() context during such a forward
        self._fused_step = False  # inside _update of a step whose direction came from backward
        self._local_grads = False  # data parallel reuse step: p.grad was not all-reduced
        self._model_hooks = []
        if reuse_via_backward:
            model = self.capture.model
            self._norms = [m for m in model.modules()
                           if isinstance(m, nn.modules.batchnorm._NormBase)]
            self._model_hooks = [model.register_forward_pre_hook(self._before_forward),
                                 model.register_forward_hook(self._after_forward)]

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.state.setdefault("weighted_sum_steps", 0)
        self._reused_cache = {}
        self._pending = None

    def close(self):
        for h in self._model_hooks:
            h.remove()
        self._model_hooks = []
        self._resume_capture()
        super().close()

    # ---- reuse_via_backward --------------------------------------------------------------
    def _resume_capture(self):
        if self._paused is not None:
            self._paused.__exit__(None, None, None)
            self._paused = None

    def _before_forward(self, module, args):
        """A forward the capture records (grad enabled, capture not paused) in a reuse step
        runs with the capture paused, unless a batch-norm module is in train mode."""
        self._resume_capture()  # a forward that raised left it paused
        if not (torch.is_grad_enabled() and self.capture.recording) or self.computing():
            return
        self._pending = None
        if not any(m.training for m in self._norms):
            self._paused = self.capture.paused()
            self._paused.__enter__()

    def _after_forward(self, module, args, output):
        if self._paused is None:
            return
        self._resume_capture()
        output = _batch_output(output)
        B = output.shape[0]
        position = self.state["step"] % self.steps_per_epoch
        dp = self.data_parallel
        if dp is not None and dp.mode == "exact":
            # rank r's rows of the global batch's c; DDP's averaging divides by R
            total, rows = self._rank_rows(B, position)
            (c,), (ok,) = self._reused(total, position)
            c = torch.where(ok, c, 1.0 / total)[rows] * dp.world
        else:
            (c,), (ok,) = self._reused(B, position)
            c = torch.where(ok, c, 1.0 / B)  # no solved batch: ḡ, as the weighted-sum path
        w = (c / self.capture.loss_scale(B)).to(device=output.device)
        self._pending = (self.state["step"], B, ok)

        def scale(grad):
            return grad * w.to(grad.dtype).reshape(B, *([1] * (grad.dim() - 1)))

        output.register_hook(scale)

    def _mean_grad(self, p, B):
        return None if self._fused_step or self._local_grads else super()._mean_grad(p, B)

    # ---- data parallel -------------------------------------------------------------------
    def _skip_grad_allreduce(self):
        """Exact mode, a reuse step on the weighted-sum path: p.grad stays local and the
        direction U c = Σ_r U_r c_r is all-reduced instead (the same bytes as DDP's)."""
        dp = self.data_parallel
        if dp is None or dp.mode != "exact" or self.computing():
            return False
        fused = self.reuse_via_backward and self._pending is not None and \
            self._pending[0] == self.state["step"]
        return not fused

    def _exact_directions(self, per_param, b):
        """First epoch / refresh: the global batch's factors gathered, the single-process
        solve; the ranks' batch sizes recorded for this position of the epoch. Reuse:
        U c = Σ_r U_r c_r with each rank's rows of the global c (`_rank_rows`), one
        all-reduce; a parameter without factors sends its share (b_r/B)·ḡ_r of the mean
        gradient."""
        dp, position = self.data_parallel, self.state["step"] % self.steps_per_epoch
        if self.computing():
            factors, B, sizes = dp.gather_factors(per_param, self._ordered_params(), b)
            self.state.setdefault("rank_sizes", {})[position] = sizes
            return self._directions(factors, B), B
        B, rows = self._rank_rows(b, position)
        coefficients, oks = self._reused(B, position)
        ok = torch.stack(oks)
        C = torch.where(ok[:, None], torch.stack(coefficients), 1.0 / B)[:, rows]
        local = natural_gradient.block_weighted_sums(per_param, self.blocks, C)
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        parts = [local[p] if p in local else super(FNGD, self)._mean_grad(p, b) * (b / B)
                 for p in params]
        summed = dp.sum(parts)
        self._local_grads = True
        true = torch.ones((), dtype=torch.bool, device=params[0].device)
        block = {id(p): l for l, (_, ps) in enumerate(self.blocks) for p in ps}
        failed = sum((~ok[block[id(p)]]).long() for p in params if p in local)
        if isinstance(failed, torch.Tensor):  # no solved batch: ḡ (c = 1/B), as a fallback
            self.state["fallbacks"] = self.state["fallbacks"] + failed.to(
                self.state["fallbacks"].device)
        return {id(p): (d, true) for p, d in zip(params, summed)}, B

    def _rank_rows(self, b, position):
        """(B, this rank's rows of the global batch) in a reuse step, from the ranks' batch
        sizes at this position of the last solving epoch (exact for unequal local batches
        whose sizes repeat from epoch to epoch; equal sizes b where none was recorded)."""
        sizes = self.state.get("rank_sizes", {}).get(position)
        return self.data_parallel.rows(
            b, sizes, f"FNGD's reuse step {self.state['step']} (position {position})")

    @torch.no_grad()
    def step(self, closure=None):
        """One step from the batch captured by the last forward and backward (with
        reuse_via_backward, in a reuse step: from the .grad that backward left, U c)."""
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            return self._step(loss)
        return self._step(None)

    def _step(self, loss):
        self._local_grads = False
        pending, self._pending = self._pending, None
        if not self.reuse_via_backward or self.computing():
            super().step()
            return loss
        if pending is None or pending[0] != self.state["step"]:
            self.state["weighted_sum_steps"] += 1
            super().step()
            return loss
        _, B, ok = pending
        dp = self.data_parallel
        if dp is not None and not dp.ddp:  # what DDP's all-reduce would have done
            dp.average_grads(p for g in self.param_groups for p in g["params"])
        directions = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:  # _update checks that U c is finite
                    directions[id(p)] = (p.grad, torch.ones((), dtype=torch.bool,
                                                            device=p.device))
        self.state["fallbacks"] = self.state["fallbacks"] + (~ok).long().to(
            self.state["fallbacks"].device) * len(directions)
        self._fused_step = True
        try:
            self._update(directions, B)
        finally:
            self._fused_step = False
        self.state["step"] += 1
        self.capture.release()
        return loss

    def computing(self, step=None):
        """Whether this step computes c from its batch's Gram (else it reuses them)."""
        step = self.state["step"] if step is None else step
        epoch = step // self.steps_per_epoch
        return epoch == 0 or (self.refresh_every is not None and epoch % self.refresh_every == 0)

    def _directions(self, per_param, B):
        step = self.state["step"]
        if self.computing(step):
            if step % self.steps_per_epoch == 0:
                self.state["coefficients"] = {}
            return self._solve_batch(per_param, B, step % self.steps_per_epoch)
        coefficients, oks = self._reused(B, step % self.steps_per_epoch)
        directions = natural_gradient.block_weighted_sums(per_param, self.blocks,
                                                          torch.stack(coefficients))
        return self._with_ok(directions, torch.stack(oks))

    def _with_ok(self, directions, ok):
        """{id(p): (d_p, ok of p's block)} for the parameters with a gradient."""
        return {id(p): (directions[p], ok[l]) for l, (_, params) in enumerate(self.blocks)
                for p in params if p.grad is not None and p in directions}

    def _solve_batch(self, per_param, B, position):
        """c = (K + λB·I)⁻¹ 1 per block (natural_gradient: the one path), recorded for reuse,
        and the directions U c."""
        self._reused_cache = {}
        K = natural_gradient.block_grams(per_param, self.blocks, B)
        solved = natural_gradient.natural_directions(
            per_param, self.blocks, K, self.block_dampings(K.dtype, K.device), B)
        for l, (name, _) in enumerate(self.blocks):
            self._record(name, solved.coefficients[l], solved.ok[l], B, position)
        return self._with_ok(solved.direction, solved.ok)

    def _record(self, name, c, ok, B, position):
        """Add w = B·c of a solved batch to the block's statistics."""
        w = torch.where(ok, B * c, 0)
        stats = self.state["coefficients"].get(name)
        if self.reuse == "mean":
            if stats is None:
                stats = {"sum": w.new_zeros(B), "count": w.new_zeros(B)}
            size = max(B, stats["sum"].shape[0])
            total, count = _grow(stats["sum"], size), _grow(stats["count"], size)
            total = torch.cat([total[:B] + w, total[B:]])
            count = torch.cat([count[:B] + ok.to(w.dtype), count[B:]])
            stats = {"sum": total, "count": count}
        else:
            if stats is None:
                stats = {"w": w.new_zeros(self.steps_per_epoch, B),
                         "size": torch.zeros(self.steps_per_epoch, dtype=torch.int64),
                         "ok": torch.zeros(self.steps_per_epoch, dtype=torch.bool,
                                           device=w.device)}
            W = _grow(stats["w"].T, max(B, stats["w"].shape[1])).T.clone()
            W[position] = torch.cat([w, w.new_full((W.shape[1] - B,), 0.0)])
            size, okrow = stats["size"].clone(), stats["ok"].clone()
            size[position], okrow[position] = B, ok
            stats = {"w": W, "size": size, "ok": okrow}
        self.state["coefficients"][name] = stats

    def _reused(self, B, position):
        coefficients, oks = [], []
        for name, _ in self.blocks:
            key = (name, B, position if self.reuse == "per_step" else None)
            if key in self._reused_cache:
                c, ok = self._reused_cache[key]
                coefficients.append(c)
                oks.append(ok)
                continue
            stats = self.state["coefficients"][name]
            if self.reuse == "mean":
                total, count = stats["sum"], stats["count"]
                overall = total.sum() / count.sum().clamp(min=1)
                mean = torch.where(count > 0, total / count.clamp(min=1), overall)
                w = torch.cat([mean, overall.expand(max(0, B - mean.shape[0]))])[:B]
                ok = count.sum() > 0
            else:
                size = int(stats["size"][position])
                row = stats["w"][position, :size]
                fill = row.mean() if size > 0 else row.new_zeros(())
                w = torch.cat([row, fill.expand(max(0, B - size))])[:B]
                ok = stats["ok"][position]
            self._reused_cache[key] = (w / B, ok)
            coefficients.append(w / B)
            oks.append(ok)
        return coefficients, oks


def _batch_output(output):
    """The tensor of a model's output whose rows are the samples: the output itself; of a
    ModelOutput or dict, "logits" if present, else its first tensor with dims; of a tuple or
    list, its first tensor with dims (exact when the loss depends on the parameters only
    through it, as a loss computed from the logits does)."""
    if isinstance(output, dict):  # transformers' ModelOutput is an OrderedDict
        candidates = [output["logits"]] if "logits" in output else list(output.values())
    elif isinstance(output, (tuple, list)):
        candidates = list(output)
    else:
        candidates = [output]
    for t in candidates:
        if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.requires_grad:
            return t
    raise TypeError("FNGD(reuse_via_backward=True): the model must return a tensor with the "
                    "batch in dim 0 that requires grad (or a ModelOutput/dict/tuple holding "
                    f"one), got {type(output).__name__}")


def _grow(t, size):
    """t (n, ...) zero-padded to (size, ...)."""
    if t.shape[0] >= size:
        return t
    return torch.cat([t, t.new_zeros(size - t.shape[0], *t.shape[1:])])
