"""Shared checks for the third-party model tests (test_models_transformers/timm/torchvision):
Capture's Gram, diagonal, weighted sums and projections against per-sample gradients from
torch.func (one torch.func.grad per sample, float64), and 20 optimizer steps on a synthetic
batch. A model case is (build, batch, losses): build() -> model (float64, eval: no dropout,
BatchNorm on running statistics, so the per-sample gradients are defined sample by sample),
batch(B) -> inputs (a tuple), losses(model, *inputs) -> the per-sample losses (B,)."""
import math
import os
import sys
import warnings

import pytest
import torch

import lowrank_kernels as lk
from lowrank_kernels.optim import FNGD, KFAC, SENG, TWA

F64 = torch.float64
REL = 1e-10


def _rows(inputs, i):
    return tuple(a[i:i + 1] if isinstance(a, torch.Tensor) and a.dim() > 0 else a
                 for a in inputs)


def per_sample_gradients(model, losses, inputs, B):
    """{name: (B, *shape)}: g_i = ∇ℓ_i from torch.func.grad of sample i's loss alone."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss_of(values, sample):
        return losses(_Bound(model, values, buffers), *sample).sum()

    rows = [torch.func.grad(loss_of)(params, _rows(inputs, i)) for i in range(B)]
    return {n: torch.stack([r[n] for r in rows]) for n in params}


class _Bound:
    """model called through torch.func.functional_call with the given parameter values."""

    def __init__(self, model, values, buffers):
        self.model, self.values, self.buffers = model, values, buffers

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self.model, (self.values, self.buffers), args, kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def _rel(a, b, floor=0.0):
    """‖a − b‖ / max(‖b‖, floor): a parameter whose gradient vanishes by symmetry (a
    key bias under softmax) is compared at the floor, a fraction of the model's scale."""
    return float((a - b).norm() / max(float(b.norm()), floor, 1e-300))


def check_capture(build, batch, losses, B=4):
    """Gram, diagonal, weighted sums and projections of Capture(model) at 1e-10 relative,
    with no fallback (a warning of the torch.func fallback fails the test)."""
    torch.manual_seed(0)
    model = build()
    inputs = batch(B)
    ref = per_sample_gradients(model, losses, inputs, B)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="capture:")
        with lk.Capture(model, backend="reference") as cap:
            losses(model, *inputs).mean().backward()
            K = cap.gram()
            diag = cap.gram(diagonal=True)
            c = torch.randn(B, dtype=F64)
            sums = cap.weighted_sum(c)
            V = {p: torch.randn_like(p) for _, p in cap.parameters()}
            proj = cap.project(V)
            per_param = cap.gram(by="parameter")
    names = dict(cap.parameters())
    U = torch.cat([ref[n].flatten(1) for n in names], 1)
    assert _rel(K, U @ U.T) < REL, f"Gram: {_rel(K, U @ U.T):.3g}"
    assert _rel(diag, (U * U).sum(1)) < REL, "diagonal"
    gram_floor, sum_floor = 1e-6 * float((U @ U.T).norm()), 1e-6 * float(U.norm())
    for n, p in names.items():
        G = ref[n].flatten(1)
        error = _rel(per_param[n], G @ G.T, gram_floor)
        assert error < REL, f"Gram of {n}: {error:.3g}"
        error = _rel(sums[p], torch.einsum("b...,b->...", ref[n], c), sum_floor)
        assert error < REL, f"U c of {n}: {error:.3g}"
    v = torch.cat([V[p].flatten() for p in names.values()])
    assert _rel(proj, U @ v) < REL, "Uᵀ v"
    return model


def _losses_of(model, losses, inputs):
    with torch.no_grad():
        return float(losses(model, *inputs).mean())


def _train(model, opt, losses, inputs, steps=20):
    history = []
    for _ in range(steps):
        opt.zero_grad()
        loss = losses(model, *inputs).mean()
        history.append(float(loss))
        loss.backward()
        opt.step()
    history.append(_losses_of(model, losses, inputs))
    return history


def _twa(model, losses, inputs, lr):
    """TWA in the span of 4 checkpoints 3 SGD steps apart, then 20 α-steps."""
    sgd = torch.optim.SGD(model.parameters(), lr=lr)
    params = [p for p in model.parameters() if p.requires_grad]
    checkpoints = []
    for _ in range(4):
        for _ in range(3):
            sgd.zero_grad()
            losses(model, *inputs).mean().backward()
            sgd.step()
        checkpoints.append(torch.cat([p.detach().flatten() for p in params]).clone())
    space = lk.subspace.build_subspace(checkpoints, dtype=F64)
    return TWA(params, space, lr=lr, init="current")


OPTIMIZERS = {
    "FNGD": lambda model, lr: FNGD(model, lr=lr, damping=1.0, steps_per_epoch=5),
    "SENG": lambda model, lr: SENG(model, lr=lr, damping=1.0, momentum=0.0),
    "KFAC": lambda model, lr: KFAC(model, lr=lr, momentum=0.0),
}


def check_optimizer(method, build, batch, losses, lr, B=4):
    """20 steps on one synthetic batch (train mode): every loss finite, the last below the
    first."""
    torch.manual_seed(0)
    model = build()
    model.train()
    inputs = batch(B)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="KFAC:")
        if method == "TWA":
            opt = _twa(model, losses, inputs, lr)
        else:
            opt = OPTIMIZERS[method](model, lr)
    history = _train(model, opt, losses, inputs)
    if hasattr(opt, "close"):
        opt.close()
    assert all(math.isfinite(h) for h in history), f"{method}: non-finite loss {history}"
    assert history[-1] < history[0], f"{method}: loss did not decrease {history[0]} -> {history[-1]}"
    return history


TORCHVISION_DIR = os.environ.get(
    "LK_TORCHVISION_DIR",
    os.path.join(os.path.expanduser("~"), ".cache", "lowrank_kernels", "torchvision"))


def import_torchvision():
    """torchvision, importable with the CPU torch: the torchvision that matches torch 2.13
    (0.28.0) is served only as a CUDA build, whose native ops (nms, roi_align, …) cannot load
    next to a CPU torch. scripts/install.sh puts it in TORCHVISION_DIR (not in site-packages,
    where transformers would try to import it); here the two operator schemas its import
    registers fake kernels for are declared, so the pure-Python model zoo imports. The
    detection ops stay unavailable (torchvision.extension._has_ops() is False). Skips, saying
    why, when it is not installed."""
    try:
        import torchvision
        return torchvision
    except Exception:
        sys.modules.pop("torchvision", None)
    if not os.path.isdir(os.path.join(TORCHVISION_DIR, "torchvision")):
        pytest.skip(f"torchvision not installed in {TORCHVISION_DIR} (scripts/install.sh "
                    "installs it there)")
    if TORCHVISION_DIR not in sys.path:
        sys.path.insert(0, TORCHVISION_DIR)
    if not hasattr(import_torchvision, "_lib"):
        try:
            lib = torch.library.Library("torchvision", "FRAGMENT")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            import_torchvision._lib = lib
        except RuntimeError:
            pass
    import torchvision
    return torchvision
