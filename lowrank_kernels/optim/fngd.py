"""FNGD — Fast Natural Gradient Descent (arXiv 2403.03473)."""
import warnings

import torch

from .. import natural_gradient
from . import _captured
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

    Reuse steps cost a plain backward: a forward with gradients enabled in such a step runs
    inside Capture.weighted, so that every captured layer's weight-gradient computation in
    the normal backward gets its output-gradient rows scaled by w_i = c_i / s (c its block's
    coefficients, loss = s·Σ_i ℓ_i: s = 1/B for "mean"), while the input-gradient chain
    stays the plain one. The backward then leaves

        p.grad = Σ_i c_i g_i = (U c)_p      for every parameter p of the optimizer

    (parameters outside it keep their plain gradient), exact for every layer kind the
    capture knows, train-mode BatchNorm / GroupNorm / LayerNorm included (g_i as Capture
    defines it: sample i's share of the batch gradient), with no weighted-sum op. A layer
    call the weighting cannot take (the torch.func fallback, a module not yet recognized)
    is recorded by the capture instead, and its part is corrected in step() with one
    weighted sum, U_call (c − s·1); this is said once in a warning. Safety: ḡ is not
    computed in such a step, so when no first-epoch solve succeeded the weights c_i = 1/B
    give ḡ through the same backward (counted per parameter in state["fallbacks"]), and a
    parameter whose U c is not finite is skipped (weights and momentum unchanged) and
    counted in state["fallbacks"] and state["skipped"]. A reuse step whose forward ran
    outside the weighting (e.g. inside opt.capture.paused()) takes the weighted-sum path,
    counted in state["weighted_sum_steps"].

    reuse_via_backward: deprecated and ignored (the weighting above is what it approximated
    with one output hook, without train-mode BatchNorm).
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
        if reuse_via_backward:
            warnings.warn("FNGD: reuse_via_backward is deprecated and ignored: every reuse step "
                          "takes U c from the backward itself (Capture.weighted), exact for "
                          "every layer kind, train-mode BatchNorm included", DeprecationWarning,
                          stacklevel=2)
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        super().__init__(model_or_params, capture, defaults, loss_reduction=loss_reduction,
                         by_layer=blocks == "layer", fallback=fallback,
                         distributed=distributed, process_group=process_group)
        self.steps_per_epoch, self.reuse, self.refresh_every = steps_per_epoch, reuse, refresh_every
        self.state["coefficients"] = {}
        self._reused_cache = {}  # (block, B, position) -> (c, ok): derived from the state
        self.state["weighted_sum_steps"] = 0
        self._weighting = None  # the capture's weighted() context during a reuse forward
        self._pending = None  # the step whose forward ran weighted
        self._fused = None  # (B, ok) of the weights that forward handed out
        self._local_grads = False  # data parallel reuse step: p.grad was not all-reduced
        self._warned = False
        model = self.capture.model
        self._model_hooks = [model.register_forward_pre_hook(self._before_forward),
                             model.register_forward_hook(self._after_forward, always_call=True)]

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.state.setdefault("weighted_sum_steps", 0)
        self._reused_cache = {}
        self._pending = None

    def close(self):
        for h in self._model_hooks:
            h.remove()
        self._model_hooks = []
        self._end_weighting()
        super().close()

    # ---- reuse steps through the backward --------------------------------------------------
    def _end_weighting(self):
        if self._weighting is not None:
            self._weighting.__exit__(None, None, None)
            self._weighting = None

    def _before_forward(self, module, args):
        """A forward the capture records (grad enabled, capture not paused) in a reuse step
        runs inside the capture's weighted() block."""
        self._end_weighting()
        if not (torch.is_grad_enabled() and self.capture.recording) or self.computing():
            return
        self._pending, self._fused = self.state["step"], None
        self._weighting = self.capture.weighted(self._weights)
        self._weighting.__enter__()

    def _after_forward(self, module, args, output):
        self._end_weighting()

    def _weights(self, B):
        """{id(p): w (B,)}: w = c / s with c the reused coefficients of p's block (ḡ's 1/B
        where no batch was solved). Exact data parallel: rank r's rows of the global batch's
        c, times R for DDP's averaging."""
        position = self.state["step"] % self.steps_per_epoch
        dp = self.data_parallel
        exact = dp is not None and dp.mode == "exact"
        key = ("weights", B, position if self.reuse == "per_step" else None)
        if not exact and key in self._reused_cache:  # derived from the state, as c is
            self._fused, W = self._reused_cache[key]
            return W
        total, rows = self._rank_rows(B, position) if exact else (B, None)
        coefficients, oks = self._reused(total, position)
        ok = torch.stack(oks)
        C = torch.where(ok[:, None], torch.stack(coefficients), 1.0 / total)
        if exact:
            C = C[:, rows] * dp.world
        self._fused = (B, ok, C)
        W = (C / self.capture.loss_scale(B)).unbind()  # one w per block, shared by its params
        W = {id(p): W[l] for l, (_, params) in enumerate(self.blocks) for p in params}
        if not exact:
            self._reused_cache[key] = (self._fused, W)
        return W

    def _mean_grad(self, p, B):
        return None if self._local_grads else super()._mean_grad(p, B)

    # ---- data parallel -------------------------------------------------------------------
    def _skip_grad_allreduce(self):
        """Exact mode, a reuse step on the weighted-sum path: p.grad stays local and the
        direction U c = Σ_r U_r c_r is all-reduced instead (the same bytes as DDP's)."""
        dp = self.data_parallel
        if dp is None or dp.mode != "exact" or self.computing():
            return False
        return self._pending != self.state["step"]

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
        """One step from the batch captured by the last forward and backward (in a reuse
        step: from the .grad that backward left, U c)."""
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            return self._step(loss)
        return self._step(None)

    def _step(self, loss):
        self._local_grads = False
        pending, fused = self._pending, self._fused
        self._pending = self._fused = None
        if self.computing():
            super().step()
            return loss
        if pending != self.state["step"]:
            self.state["weighted_sum_steps"] += 1
            super().step()
            return loss
        try:
            dp = self.data_parallel
            if dp is not None and not dp.ddp:  # what DDP's all-reduce would have done
                dp.average_grads(p for g in self.param_groups for p in g["params"])
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            directions = dict(zip(map(id, params), self._recorded_corrections(params, fused)))
            if fused is not None:  # no solved batch: ḡ (c = 1/B) per block, as a fallback
                ok = fused[1]
                block = {id(p): l for l, (_, ps) in enumerate(self.blocks) for p in ps}
                counts = torch.bincount(torch.tensor([block[id(p)] for p in params]),
                                        minlength=ok.shape[0]).to(ok.device)
                self.state["fallbacks"] = self.state["fallbacks"] + (~ok).long() @ counts
            self._update_without_fallback(directions)
            self.state["step"] += 1
        finally:
            self.capture.release()
        return loss

    def _recorded_corrections(self, params, fused):
        """[U c for each p]: p.grad, plus U_call (c − s·1) for the calls the capture recorded
        instead of weighting them (their backward gave the plain s·U_call 1); averaged over
        the ranks like p.grad."""
        grads = [p.grad for p in params]
        if fused is None or not self.capture.recorded:
            return grads
        if not self._warned:
            self._warned = True
            warnings.warn("FNGD: some layer calls could not be weighted in the backward (the "
                          "torch.func fallback or a module not yet recognized): their U c "
                          "comes from a weighted sum after it, as in the first epoch",
                          stacklevel=3)
        _, _, C = fused
        per_param, b = _captured.contributions(self.capture)
        C = C - self.capture.loss_scale(b)
        fix = natural_gradient.block_weighted_sums(per_param, self.blocks, C)
        parts = [fix[p] if p in fix else torch.zeros_like(p.grad) for p in params]
        if self.data_parallel is not None:
            parts = self.data_parallel.average(parts)
        return [g + d.to(g.dtype) for g, d in zip(grads, parts)]

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


def _grow(t, size):
    """t (n, ...) zero-padded to (size, ...)."""
    if t.shape[0] >= size:
        return t
    return torch.cat([t, t.new_zeros(size - t.shape[0], *t.shape[1:])])
