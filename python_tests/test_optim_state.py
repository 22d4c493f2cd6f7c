"""FNGD / SENG / KFAC: bit-for-bit resume from state_dict, safety (non-finite gradients,
indefinite Gram), bf16 autocast, bad arguments."""
import contextlib
import io

import pytest
import torch
import torch.nn.functional as F

import lowrank_kernels as lk
from lowrank_kernels.capture import Capture
from lowrank_kernels import natural_gradient
from lowrank_kernels.optim import FNGD, KFAC, SENG

import optim_reference as ref

MAKERS = {
    "fngd-mean": lambda m: FNGD(m, lr=0.1, damping=0.05, steps_per_epoch=3, momentum=0.9,
                                weight_decay=1e-3),
    "fngd-per_step-model": lambda m: FNGD(m, lr=0.1, damping=0.05, steps_per_epoch=3,
                                          reuse="per_step", blocks="model", momentum=0.5),
    "seng": lambda m: SENG(m, lr=0.1, damping=0.05, update_freq=3, momentum=0.9,
                           weight_decay=1e-3, sketch_threshold=20, sketch_size=3),
    "kfac": lambda m: KFAC(m, lr=0.1, damping=0.05, inverse_every=3, momentum=0.9),
}


def _train(model, opt, batches):
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("make", [ref.mlp, ref.cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("name", list(MAKERS))
def test_resume_is_bit_for_bit(name, make):
    """N = 4 steps, save; M = 4 more vs a fresh model + optimizer loaded from the save (the
    save falls mid-epoch / mid-curvature period; batches of varying size)."""
    model = make(seed=0, dtype=torch.float32)
    sizes = [6, 6, 5, 6, 6, 4, 6, 6]
    batches = [ref.batch(model, B, 40 + k, torch.float32) for k, B in enumerate(sizes)]
    opt = MAKERS[name](model)
    _train(model, opt, batches[:4])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _train(model, opt, batches[4:])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = make(seed=1, dtype=torch.float32)
    fresh.load_state_dict(saved["model"])
    opt2 = MAKERS[name](fresh)
    opt2.load_state_dict(saved["opt"])
    _train(fresh, opt2, batches[4:])
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n
    assert opt2.state["step"] == 8


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
@pytest.mark.parametrize("name", list(MAKERS))
def test_non_finite_gradients_never_reach_the_weights(name, strict):
    """A NaN in one sample's input makes every captured factor, Gram and gradient NaN: all
    parameters are skipped (weights and momentum unchanged) and counted; the next, clean
    batch trains normally. On the default path (NaN flows into the results, tested on the
    device) and in strict mode (the ops raise NonFiniteError, the step is skipped)."""
    with lk.strict() if strict else contextlib.nullcontext():
        _non_finite_batch_is_skipped(name)


def _non_finite_batch_is_skipped(name):
    model = ref.mlp(dtype=torch.float32)
    opt = MAKERS[name](model)
    _train(model, opt, [ref.batch(model, 6, 1, torch.float32)])
    before = [p.detach().clone() for p in model.parameters()]
    buffers = [opt.state[p].get("momentum_buffer") for p in model.parameters()]
    buffers = [None if b is None else b.clone() for b in buffers]
    x, y = ref.batch(model, 6, 2, torch.float32)
    x[2, 1] = float("nan")
    _train(model, opt, [(x, y)])
    n = len(before)
    assert int(opt.state["skipped"]) == n
    for p, b, buf in zip(model.parameters(), before, buffers):
        assert torch.equal(p, b)
        if buf is not None:
            assert torch.equal(opt.state[p]["momentum_buffer"], buf)
    _train(model, opt, [ref.batch(model, 6, 3, torch.float32)])
    assert int(opt.state["skipped"]) == n
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not any(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
@pytest.mark.parametrize("name", list(MAKERS))
def test_a_huge_finite_loss_does_not_kill_training(name, strict):
    """loss × 1e30 overflows the fp32 Grams (finite inputs, Inf results): the step falls back
    or is skipped, nothing non-finite reaches the weights, and the next clean batches train
    (the capture is released even when a step raised)."""
    model = ref.mlp(dtype=torch.float32)
    opt = MAKERS[name](model)
    _train(model, opt, [ref.batch(model, 6, 1, torch.float32)])
    x, y = ref.batch(model, 6, 2, torch.float32)
    with lk.strict() if strict else contextlib.nullcontext():
        loss = torch.nn.functional.cross_entropy(model(x), y) * 1e30
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    skipped = int(opt.state["skipped"])
    for seed in (3, 4):
        _train(model, opt, [ref.batch(model, 6, seed, torch.float32)])
    assert int(opt.state["skipped"]) == skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not any(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("method", ["fngd", "seng"])
def test_indefinite_gram_falls_back_to_gradient(method, monkeypatch):
    """An indefinite K (−10·(‖K‖ + λB)·I) for the last layer: woodbury_solve fails (its jitter
    ladder cannot rescue it), that layer takes the mean-gradient step (exactly), the first
    layer its natural-gradient step; state["fallbacks"] counts the 2 parameters."""
    model = ref.mlp()
    lam = 0.05
    opt = (FNGD(model, lr=1.0, damping=lam, steps_per_epoch=2) if method == "fngd"
           else SENG(model, lr=1.0, damping=lam, momentum=0.0))
    block_grams = natural_gradient.block_grams
    last = next(l for l, (_, params) in enumerate(opt.blocks)
                if params[0] is next(model[2].parameters()))
    calls = []

    def patched(*args, **kwargs):
        K = block_grams(*args, **kwargs).clone()
        B = K.shape[1]
        calls.append(K)
        K[last] = -10 * (K[last].norm() + lam * B) * torch.eye(B, dtype=K.dtype)
        return K

    x, y = ref.batch(model, 6, 5)
    with opt.capture.paused():
        grads = ref.per_sample_grads(model, x, y)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    F.cross_entropy(model(x), y).backward()
    monkeypatch.setattr(natural_gradient, "block_grams", patched)
    opt.step()
    assert calls and int(opt.state["fallbacks"]) == 2 and int(opt.state["skipped"]) == 0
    for n, p in model.named_parameters():
        update = before[n] - p.detach()
        if n.startswith("2."):
            expect = grads[n].mean(0)
        else:
            names = ["0.weight", "0.bias"]
            d = ref.natural_gradient(ref.stacked(grads, names), lam)
            expect = ref.split(d, grads, names)[n]
        assert ref.relative_error(update, expect) < 1e-10, n


@pytest.mark.parametrize("name", list(MAKERS))
def test_bf16_autocast_trains(name):
    """CPU autocast bf16 forward (params fp32): no fallbacks, finite weights, the loss on a
    fixed batch goes down."""
    model = ref.cnn(dtype=torch.float32)
    opt = MAKERS[name](model)
    x, y = ref.batch(model, 8, 6, torch.float32)
    losses = []
    for _ in range(8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert int(opt.state["fallbacks"]) == 0 and int(opt.state["skipped"]) == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.8 * losses[0]


def test_bad_arguments_name_the_argument():
    model = ref.mlp()
    with pytest.raises(ValueError, match="lr"):
        FNGD(model, lr=0.0, steps_per_epoch=2)
    with pytest.raises(ValueError, match="damping"):
        SENG(model, lr=0.1, damping=-1.0)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        FNGD(model, lr=0.1, steps_per_epoch=0)
    with pytest.raises(ValueError, match="blocks"):
        FNGD(model, lr=0.1, steps_per_epoch=2, blocks="row")
    with pytest.raises(ValueError, match="reuse"):
        FNGD(model, lr=0.1, steps_per_epoch=2, reuse="median")
    with pytest.raises(ValueError, match="update_freq"):
        SENG(model, lr=0.1, update_freq=0)
    with pytest.raises(TypeError, match="damping_schedule"):
        SENG(model, lr=0.1, damping_schedule=0.5)
    with pytest.raises(ValueError, match="inverse_every"):
        KFAC(model, lr=0.1, inverse_every=0)
    with pytest.raises(TypeError, match="capture"):
        FNGD(model.parameters(), lr=0.1, steps_per_epoch=2)
    with pytest.raises(ValueError, match="either a model"):
        FNGD(model, lr=0.1, steps_per_epoch=2, capture=Capture(model))


class _Squared(torch.nn.Module):
    """A layer Capture has no kernel for: y = x ⊙ w²."""

    def __init__(self, d):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=torch.float64))

    def forward(self, x):
        return x * self.w ** 2


@pytest.mark.parametrize("make", [
    lambda m, **k: FNGD(m, lr=0.1, damping=0.1, steps_per_epoch=2, **k),
    lambda m, **k: SENG(m, lr=0.1, damping=0.1, **k),
    lambda m, **k: KFAC(m, lr=0.1, damping=0.1, **k)], ids=["fngd", "seng", "kfac"])
def test_fallback_argument_reaches_the_capture(make):
    """Without fallback a layer Capture has no kernel for is refused by name; with
    fallback=True the optimizer trains through the torch.func fallback (warned once)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 6).double(), _Squared(6),
                                torch.nn.Linear(6, 3).double())
    with pytest.raises(TypeError, match="'1'"):
        make(model)
    with pytest.warns(UserWarning, match="'1'"):
        opt = make(model, fallback=True)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    losses = []
    for _ in range(4):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0] and int(opt.state["skipped"]) == 0
    opt.close()


class _TwoHeads(torch.nn.Module):
    """A trunk and two heads; a batch uses one head (the other gets no gradient)."""

    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Linear(4, 6).double()
        self.heads = torch.nn.ModuleList([torch.nn.Linear(6, 3).double() for _ in range(2)])
        self.head = 0

    def forward(self, x):
        return self.heads[self.head](torch.tanh(self.trunk(x)))


@pytest.mark.parametrize("make", [
    lambda m: SENG(m, lr=0.1, damping=0.1, update_freq=3),
    lambda m: FNGD(m, lr=0.1, damping=0.1, steps_per_epoch=2)], ids=["seng", "fngd"])
def test_a_module_without_gradient_this_batch(make):
    """A block whose parameters got no gradient this batch (an unused head) is left alone in
    refresh, between-refresh and reuse steps; the used ones train."""
    model = _TwoHeads()
    opt = make(model)
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        model.head = step % 2
        x = torch.randn(5, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (5,), generator=g)
        idle = [p.detach().clone() for p in model.heads[1 - model.head].parameters()]
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert all(torch.equal(p, q) for p, q in
                   zip(model.heads[1 - model.head].parameters(), idle)), step
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert int(opt.state["skipped"]) == 0
    opt.close()
