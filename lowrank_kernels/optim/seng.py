"""SENG — Sketchy Empirical Natural Gradient (arXiv 2006.05924)."""
import torch

from .. import natural_gradient
from . import _captured
from ._base import GuardedOptimizer
from ._sketch import sketched_gram


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
    (seed, step, parameter) so a resumed run draws the same sketches.

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
        """Refresh: the global batch's factors gathered (kept: identical on every rank).
        Between refreshes: the kept curvature and the DDP-averaged ḡ, no communication."""
        if self._refreshing():
            return super()._exact_directions(per_param, b)
        return self._precondition(per_param, b), b

    def _refresh(self, per_param, B, step):
        """The batch's curvature (K per block, sketched for big parameters) and d = U c,
        c = (K + λB·I)⁻¹ 1 (natural_gradient: the one path); the factors, K, λ and B kept."""
        index = {id(p): i for i, p in enumerate(p for _, params in self.blocks for p in params)}

        def gram(p, factors):
            if p.numel() <= self.sketch_threshold:
                return factors.gram()
            seed = (self.seed * 1_000_003 + step * 4099 + (index[id(p)] + 1) * 64) % 2 ** 62
            return sketched_gram(factors, self.sketch_size, seed)

        K = natural_gradient.block_grams(per_param, self.blocks, B, gram)
        lams = [self.damping(params, step) for _, params in self.blocks]
        lam = torch.tensor(lams, dtype=K.dtype, device=K.device)
        solved = natural_gradient.natural_directions(per_param, self.blocks, K, lam, B)
        self.state["curvature"] = {
            "K": K, "damping": torch.tensor(lams, dtype=K.dtype), "batch_size": B,
            "ok": solved.ok,
            "factors": [[_captured.pack(per_param.get(p)) for p in params]
                        for _, params in self.blocks]}
        return self._with_ok(solved.direction, solved.ok)

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
