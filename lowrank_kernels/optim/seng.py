"""SENG — Sketchy Empirical Natural Gradient (arXiv 2006.05924)."""
import torch

from .. import natural_gradient
from . import _captured
from ._base import GuardedOptimizer
from ._sketch import DIST, sketched_gram


class SENG(GuardedOptimizer):
    """SENG(model, lr, damping=1e-2, *, update_freq=1, momentum=0.9, weight_decay=0,
            damping_schedule=None, sketch_threshold=2**20, sketch_size=128, seed=0,
            loss_reduction="mean")
    SENG(params, lr, ..., capture=Capture(model))

    Per-layer empirical-Fisher natural gradient in sample space. For each layer (a module's
    weight and bias), with the per-sample gradients U = [g_1 … g_B] of a batch,

        (F + λI)⁻¹ v = (v − U (K + λB·I)⁻¹ Uᵀ v) / λ,   F = UUᵀ/B,  K = UᵀU.

    Curvature refresh (every `update_freq` steps, step 0 included): the layer's K of the
    current batch is computed, c = (K + λB·I)⁻¹ 1 is solved (`woodbury_solve`, all layers in
    one batched call) and the direction is the exact weighted sum d = U c = (F + λI)⁻¹ ḡ (the
    weighted-sum op, not the √|c| approximation of the public code). Any batch size works.
    The batch's factors (the captured layer inputs and output gradients, not U itself), K, λ
    and B are kept. Steps in between precondition the new mean gradient ḡ with that kept
    curvature: d = (ḡ − U_r (K_r + λ_r B_r·I)⁻¹ U_rᵀ ḡ) / λ_r (one projection, one batched
    solve, one weighted sum per layer).

    Sketching: a parameter with more than `sketch_threshold` entries gets its Gram from a
    Kronecker sketch of its two factors with `sketch_size` columns per side (see _sketch:
    E[K̃] = K); the weighted sums and projections stay exact. Ω is regenerated from
    (seed, step, parameter) so a resumed run draws the same sketches. Data parallel (exact):
    a refresh all-gathers the ranks' factors; with update_freq=1 a sketched layer sends only
    its sketches and its direction is all-reduced (`_sketched_exchange`, README).

    damping: λ, or damping_schedule(step) -> λ (e.g. a decay) evaluated at each refresh.
    Update: θ ← θ − lr·buf, buf ← μ·buf + d + wd·θ. A failed solve or a non-finite direction
    falls back to ḡ for that layer (state["fallbacks"]); a non-finite ḡ skips the parameter
    (state["skipped"]). Memory: the refresh batch's layer inputs and output gradients are
    kept until the next refresh.
    """

    def __init__(self, model_or_params, lr, damping=1e-2, *, update_freq=1, momentum=0.9,
                 weight_decay=0.0, damping_schedule=None, sketch_threshold=2 ** 20,
                 sketch_size=128, seed=0, loss_reduction="mean", capture=None, fallback=False,
                 distributed="auto", process_group=None):
        if not lr > 0:
            raise ValueError(f"SENG: lr must be > 0, got {lr}")
        if not damping > 0:
            raise ValueError(f"SENG: damping must be > 0, got {damping}")
        if not (isinstance(update_freq, int) and update_freq >= 1):
            raise ValueError(f"SENG: update_freq must be an int >= 1, got {update_freq!r}")
        if damping_schedule is not None and not callable(damping_schedule):
            raise TypeError("SENG: damping_schedule must be a callable step -> damping")
        if not (isinstance(sketch_size, int) and sketch_size >= 1):
            raise ValueError(f"SENG: sketch_size must be an int >= 1, got {sketch_size!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"SENG: momentum must be in [0, 1), got {momentum}")
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        super().__init__(model_or_params, capture, defaults, loss_reduction=loss_reduction,
                         by_layer=True, fallback=fallback, distributed=distributed,
                         process_group=process_group)
        self.update_freq, self.damping_schedule = update_freq, damping_schedule
        self.sketch_threshold, self.sketch_size, self.seed = sketch_threshold, sketch_size, seed
        self.state["curvature"] = None
        self._position = {id(p): k for k, p in enumerate(self._ordered_params())}
        dp = self.data_parallel
        # exact data parallel, every step a refresh, a layer big enough to sketch: the ranks
        # exchange sketches (see _sketched_exchange)
        self._sketch_exchange = dp is not None and dp.mode == "exact" and update_freq == 1 and \
            any(p.numel() > sketch_threshold for _, params in self.blocks for p in params)
        self._global_grads = None  # {p: ḡ} of a sketch-exchange step (None: p.grad's)

    def damping(self, params, step):
        if self.damping_schedule is not None:
            value = float(self.damping_schedule(step))
            if not value > 0:
                raise ValueError(f"SENG: damping_schedule({step}) must be > 0, got {value}")
            return value
        return self.group_of(params[0])["damping"]

    def _directions(self, per_param, B):
        step = self.state["step"]
        if step % self.update_freq == 0 or self.state["curvature"] is None:
            return self._refresh(per_param, B, step)
        return self._precondition(per_param, B)

    def _refreshing(self):
        return self.state["step"] % self.update_freq == 0 or self.state["curvature"] is None

    def _exact_directions(self, per_param, b):
        """Refresh: the global batch's factors gathered (kept: identical on every rank), or,
        with update_freq = 1 and sketched layers, `_sketched_exchange`. Between refreshes: the
        kept curvature and the DDP-averaged ḡ, no communication."""
        self._global_grads = None
        if self._sketch_exchange:
            return self._sketched_exchange(per_param, b)
        if self._refreshing():
            return super()._exact_directions(per_param, b)
        return self._precondition(per_param, b), b

    def _skip_grad_allreduce(self):
        """The sketch exchange all-reduces the directions and gradients itself (asked by DDP's
        comm hook during backward)."""
        return self._sketch_exchange

    def _sketched_exchange(self, per_param, b):
        """A refresh on R ranks (update_freq = 1: nothing kept for later steps) that sends a
        sketched layer's sketches instead of its factors:

            K_l = Σ_{p ∈ l} [K̃_p from the gathered sketches | K_p from the gathered factors]
            c = (K + λB·I)⁻¹ 1 (every rank, identical),   d_p = Σ_r U_p,r c_r (all-reduced)

        (c_r: rank r's rows of c; a failed block takes c = 1/B, d_p = ḡ_p, counted as a
        fallback). That all-reduce replaces DDP's: it carries, for every other parameter, the
        rank's share (b_r/B)·ḡ_r of the global mean gradient (exact for unequal b_r too).
        The Ω of each sketch is the single-process one ((seed, step, parameter)), so the
        update is the single-process update on the global batch."""
        dp, step = self.data_parallel, self.state["step"]
        sketched = {}
        for p, f in per_param.items():
            if p.numel() > self.sketch_threshold:
                s = f.sketch(self.sketch_size, self._sketch_seed(p, step), dist=DIST)
                if s is not f:
                    sketched[p] = s
        sent = {p: sketched.get(p, f) for p, f in per_param.items()}
        gathered, B, sizes = dp.gather_factors(sent, self._ordered_params(), b)
        K = natural_gradient.block_grams(gathered, self.blocks, B)
        lams = [self.damping(params, step) for _, params in self.blocks]
        lam = torch.tensor(lams, dtype=K.dtype, device=K.device)
        exact = {p: f for p, f in gathered.items() if p not in sketched}
        solved = natural_gradient.natural_directions(exact, self.blocks, K, lam, B)
        start = sum(sizes[:dp.rank])
        C = torch.where(solved.ok[:, None], solved.coefficients, 1.0 / B)[:, start:start + b]
        local = natural_gradient.block_weighted_sums(
            {p: per_param[p] for p in sketched}, self.blocks, C)
        with_grad = [p for p in self._ordered_params() if p.grad is not None]
        parts = [local[p] if p in local else super(SENG, self)._mean_grad(p, b) * (b / B)
                 for p in with_grad]
        summed = dict(zip(with_grad, dp.sum(parts)))
        self._global_grads = {p: g for p, g in summed.items() if p not in local}
        self._keep(K, lams, B, solved.ok, exact)
        directions = self._with_ok(solved.direction, solved.ok)
        block = {id(p): l for l, (_, ps) in enumerate(self.blocks) for p in ps}
        true = torch.ones((), dtype=torch.bool, device=solved.ok.device)
        for p in local:
            directions[id(p)] = (summed[p], true)
            self.state["fallbacks"] = self.state["fallbacks"] + \
                (~solved.ok[block[id(p)]]).long().to(self.state["fallbacks"].device)
        return directions, B

    def _mean_grad(self, p, B):
        """ḡ: the sketch exchange's all-reduced one (None for a sketched layer: its direction
        already falls back to ḡ), else from p.grad."""
        if self._global_grads is not None:
            return self._global_grads.get(p)
        return super()._mean_grad(p, B)

    def _sketch_seed(self, p, step):
        """The seed of p's sketch Ω at `step` ((seed, step, p's position in the blocks))."""
        return (self.seed * 1_000_003 + step * 4099 + (self._position[id(p)] + 1) * 64) % 2 ** 62

    def _refresh(self, per_param, B, step):
        """The batch's curvature (K per block, sketched for big parameters) and d = U c,
        c = (K + λB·I)⁻¹ 1 (natural_gradient: the one path); the factors, K, λ and B kept."""
        def gram(p, factors):
            if p.numel() <= self.sketch_threshold:
                return factors.gram()
            return sketched_gram(factors, self.sketch_size, self._sketch_seed(p, step))

        K = natural_gradient.block_grams(per_param, self.blocks, B, gram)
        lams = [self.damping(params, step) for _, params in self.blocks]
        lam = torch.tensor(lams, dtype=K.dtype, device=K.device)
        solved = natural_gradient.natural_directions(per_param, self.blocks, K, lam, B)
        self._keep(K, lams, B, solved.ok, per_param)
        return self._with_ok(solved.direction, solved.ok)

    def _keep(self, K, lams, B, ok, factors):
        """The refresh batch's curvature, for the steps until the next refresh."""
        self.state["curvature"] = {
            "K": K, "damping": torch.tensor(lams, dtype=K.dtype), "batch_size": B, "ok": ok,
            "factors": [[_captured.pack(factors.get(p)) for p in params]
                        for _, params in self.blocks]}

    def _precondition(self, per_param, B):
        """d = (ḡ − U_r (K_r + λ_r B_r·I)⁻¹ U_rᵀ ḡ) / λ_r with the kept curvature (the general-v
        formula of natural_gradient)."""
        curvature = self.state["curvature"]
        K, Br = curvature["K"], curvature["batch_size"]
        lam = curvature["damping"].to(K.device)
        backend = self.capture.backend
        kept = {p: _captured.unpack(f, backend)
                for (_, params), block in zip(self.blocks, curvature["factors"])
                for p, f in zip(params, block)}
        kept = {p: f for p, f in kept.items() if f is not None}
        grads = {p: self._mean_grad(p, B)
                 for _, params in self.blocks for p in params if p.grad is not None}
        solved = natural_gradient.natural_directions(kept, self.blocks, K, lam, Br, grads)
        return self._with_ok(solved.direction, solved.ok & curvature["ok"])

    def _with_ok(self, directions, ok):
        """{id(p): (d_p, ok of p's block)} for the parameters with a gradient."""
        return {id(p): (directions[p], ok[l]) for l, (_, params) in enumerate(self.blocks)
                for p in params if p.grad is not None and p in directions}
