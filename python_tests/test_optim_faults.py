"""Fault injection for every optimizer and mode (issue 12): NaN inputs, Inf gradients and
huge-but-finite losses at seeded random steps — in the first epoch and in reuse /
between-refresh steps — on the default path and in strict mode. Nothing non-finite ever
reaches the weights, a step that cannot be taken is skipped (counted) or falls back to the
mean gradient (counted), and the optimizer is ready for the next batch: the clean steps that
follow move the weights and stay finite."""
import contextlib
import random

import pytest
import torch
import torch.nn.functional as F

import lowrank_kernels as lk
from lowrank_kernels.optim import FNGD, KFAC, SENG, TWA
from lowrank_kernels.subspace import build_subspace

import optim_reference as ref

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 8
OPTIMIZERS = {
    "fngd-layer-mean": lambda m: FNGD(m, lr=0.1, damping=0.05, steps_per_epoch=3,
                                      momentum=0.9),
    "fngd-model-per_step": lambda m: FNGD(m, lr=0.1, damping=0.05, steps_per_epoch=3,
                                          blocks="model", reuse="per_step"),
    "fngd-model-mean": lambda m: FNGD(m, lr=0.1, damping=0.05, steps_per_epoch=3,
                                      blocks="model"),
    "seng-refresh-each": lambda m: SENG(m, lr=0.1, damping=0.05, update_freq=1),
    "seng-sketch-freq3": lambda m: SENG(m, lr=0.1, damping=0.05, update_freq=3,
                                        sketch_threshold=20, sketch_size=3),
    "kfac": lambda m: KFAC(m, lr=0.1, damping=0.05, inverse_every=3),
}
FAULTS = ["nan-input", "inf-grad", "huge-loss"]


def _loss(model, x, y, fault):
    if fault == "nan-input":
        x = x.clone()
        x[1, 0] = float("nan")
    loss = F.cross_entropy(model(x), y)
    return loss * 1e30 if fault == "huge-loss" else loss


def _step(model, opt, x, y, fault=None):
    _loss(model, x, y, fault).backward()
    if fault == "inf-grad":
        next(model.parameters()).grad[0].fill_(float("inf"))
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_fault_never_reaches_the_weights(name, fault, strict):
    rng = random.Random(f"{name}-{fault}-{strict}")
    faulty = sorted(rng.sample(range(1, STEPS - 2), 2))  # one early, one later (reuse)
    model = ref.mlp(dtype=torch.float32)
    opt = OPTIMIZERS[name](model)
    for step in range(STEPS):
        x, y = ref.batch(model, 6, 100 + step, torch.float32)
        before = [p.detach().clone() for p in model.parameters()]
        with lk.strict() if strict else contextlib.nullcontext():
            _step(model, opt, x, y, fault if step in faulty else None)
        assert all(torch.isfinite(p).all() for p in model.parameters()), (step, faulty)
        if step not in faulty and step - 1 not in faulty and step > 0:
            # a clean step after clean steps trains
            assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before)), step
    if fault == "nan-input":  # every parameter of both faulty steps skipped
        assert int(opt.state["skipped"]) == 2 * len(list(model.parameters()))
    assert opt.state["step"] == STEPS
    opt.close()


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
@pytest.mark.parametrize("fault", FAULTS)
def test_twa_skips_a_faulty_step(fault, strict):
    torch.manual_seed(0)
    model = ref.mlp(dtype=torch.float32)
    points = []
    for k in range(4):  # a few checkpoints of a short SGD run span the subspace
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        points.append({n: p.detach().clone() for n, p in model.named_parameters()})
    opt = TWA(model.parameters(), build_subspace(points, model=model), lr=0.1)
    rng = random.Random(f"twa-{fault}-{strict}")
    faulty = sorted(rng.sample(range(1, STEPS - 2), 2))
    for step in range(STEPS):
        x, y = ref.batch(model, 6, 200 + step, torch.float32)
        before = [p.detach().clone() for p in model.parameters()]
        with lk.strict() if strict else contextlib.nullcontext():
            _loss(model, x, y, fault if step in faulty else None).backward()
            if step in faulty and fault == "inf-grad":
                next(model.parameters()).grad[0].fill_(float("inf"))
            opt.step()
            opt.zero_grad()
        assert all(torch.isfinite(p).all() for p in model.parameters()), step
        if step in faulty and fault != "huge-loss":
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)), step
    assert int(opt.state["skipped"]) >= (0 if fault == "huge-loss" else 2)
