"""FNGD's reuse steps through the backward (the default since Capture.weighted; the old
reuse_via_backward option is deprecated and ignored): a reuse step's direction U c = Σ_i c_i g_i
comes from the backward itself. Float64 against torch.func per-sample gradients (1e-12
relative: only the order of summation differs); resume, non-finite batches, no solved
batch, the deprecated option and bad arguments. The exactness on train-mode BatchNorm,
GroupNorm and GPT-2 is in test_optim_fngd_reuse.py."""
import io

import optim_reference as ref
import pytest
import torch
import torch.nn.functional as F

from lowrank_kernels.optim import FNGD

pytestmark = pytest.mark.usefixtures("one_thread")

LAM = 0.05
SIZES = [6, 5, 6, 4, 7, 6]  # epoch 0 = the first 2 steps; 7 has a never-seen position


def _make(model, reduction="mean", reuse="mean", **kw):
    kw = {"momentum": 0.9, "weight_decay": 1e-3, **kw}
    return FNGD(model, lr=0.1, damping=LAM, steps_per_epoch=2, blocks="model", reuse=reuse,
                loss_reduction=reduction, **kw)


def _train(model, opt, batches, reduction="mean"):
    for x, y in batches:
        F.cross_entropy(model(x), y, reduction=reduction).backward()
        opt.step()
        opt.zero_grad()


def _relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("make", [ref.mlp, ref.cnn], ids=["mlp", "cnn"])
def test_deprecated_option_is_ignored(make, reduction):
    """reuse_via_backward=True warns (DeprecationWarning) and trains bit for bit as the
    default; in a reuse step the capture records nothing (every layer is weighted)."""
    model, twin = make(), make()
    with pytest.warns(DeprecationWarning, match="reuse_via_backward"):
        old = _make(twin, reduction, reuse_via_backward=True)
    opt = _make(model, reduction)
    for k, B in enumerate(SIZES):
        x, y = ref.batch(model, B, 10 + k)
        reusing = not opt.computing()
        F.cross_entropy(model(x), y, reduction=reduction).backward()
        if reusing:
            assert not opt.capture.recorded
        opt.step()
        opt.zero_grad()
        _train(twin, old, [(x, y)], reduction)
        for (n, p), q in zip(model.named_parameters(), twin.parameters()):
            assert torch.equal(p, q), (k, n)
    assert int(opt.state["fallbacks"]) == 0 and int(opt.state["skipped"]) == 0
    assert opt.state["weighted_sum_steps"] == 0


@pytest.mark.parametrize("blocks", ["layer", "model"])
def test_direction_is_weighted_sum_of_per_sample_gradients(blocks):
    """lr = 1, no momentum: a reuse step moves θ by exactly Σ_i c_i g_i, c = w̄/B of each
    block, with g_i from torch.func and w̄ the mean of the first-epoch weights (one batch)."""
    model = ref.cnn()
    opt = FNGD(model, lr=1.0, damping=LAM, steps_per_epoch=1, blocks=blocks)
    _train(model, opt, [ref.batch(model, 6, 1)])
    x, y = ref.batch(model, 6, 2)
    with opt.capture.paused():
        grads = ref.per_sample_grads(model, x, y)
    block_of = {id(p): name for name, ps in opt.blocks for p in ps}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, opt, [(x, y)])
    for n, p in model.named_parameters():
        stats = opt.state["coefficients"][block_of[id(p)]]
        c = stats["sum"] / stats["count"] / 6
        expect = torch.einsum("i,i...->...", c, grads[n])
        assert _relative(before[n] - p.detach(), expect) < 1e-12, n


@pytest.mark.parametrize("save_after", [1, 3], ids=["save-in-epoch-0", "save-reusing"])
@pytest.mark.parametrize("make", [ref.mlp, ref.cnn], ids=["mlp", "cnn"])
def test_resume_is_bit_for_bit(make, save_after):
    model = make(seed=0, dtype=torch.float32)
    batches = [ref.batch(model, B, 40 + k, torch.float32) for k, B in enumerate(SIZES)]
    opt = _make(model)
    _train(model, opt, batches[:save_after])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _train(model, opt, batches[save_after:])
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = make(seed=1, dtype=torch.float32)
    fresh.load_state_dict(saved["model"])
    opt2 = _make(fresh)
    opt2.load_state_dict(saved["opt"])
    _train(fresh, opt2, batches[save_after:])
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n
    assert opt2.state["step"] == len(SIZES)


def test_non_finite_batch_is_skipped():
    """A NaN in one sample's input in a reuse step makes U c NaN: every parameter is skipped
    (weights and momentum unchanged) and counted in fallbacks and skipped; the next, clean
    batch trains through the backward again."""
    model = ref.mlp(dtype=torch.float32)
    opt = _make(model)
    _train(model, opt, [ref.batch(model, 6, k, torch.float32) for k in range(3)])
    before = [p.detach().clone() for p in model.parameters()]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    x, y = ref.batch(model, 6, 5, torch.float32)
    x[2, 1] = float("nan")
    _train(model, opt, [(x, y)])
    n = len(before)
    assert int(opt.state["skipped"]) == n and int(opt.state["fallbacks"]) == n
    for p, b, buf in zip(model.parameters(), before, buffers):
        assert torch.equal(p, b) and torch.equal(opt.state[p]["momentum_buffer"], buf)
    _train(model, opt, [ref.batch(model, 6, 6, torch.float32)])
    assert int(opt.state["skipped"]) == n and opt.state["weighted_sum_steps"] == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not any(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_no_solved_batch_gives_mean_gradient():
    """The only first-epoch batch is non-finite (no coefficients): a reuse step takes the
    mean gradient ḡ, as the weighted-sum path does, counted per parameter in fallbacks."""
    model = ref.mlp()
    opt = FNGD(model, lr=1.0, damping=LAM, steps_per_epoch=1, blocks="model",
               loss_reduction="sum")
    x, y = ref.batch(model, 6, 1)
    x[0, 0] = float("nan")
    _train(model, opt, [(x, y)], "sum")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    n = len(list(model.parameters()))
    fallbacks = int(opt.state["fallbacks"])
    x, y = ref.batch(model, 5, 2)
    with opt.capture.paused():
        grads = ref.per_sample_grads(model, x, y)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    _train(model, opt, [(x, y)], "sum")
    assert int(opt.state["fallbacks"]) == fallbacks + n
    for k, p in model.named_parameters():
        assert _relative(before[k] - p.detach(), grads[k].mean(0)) < 1e-12, k


def test_bad_arguments():
    model = ref.mlp()
    with pytest.raises(ValueError, match="reuse_via_backward"):
        FNGD(model, lr=0.1, steps_per_epoch=2, blocks="model", reuse_via_backward="yes")
