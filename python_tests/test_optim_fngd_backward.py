"""FNGD(reuse_via_backward=True): a reuse step's direction U c = Σ_i c_i g_i comes from the
backward itself (row i of the output gradient scaled by c_i / s, loss = s·Σ_i ℓ_i). Compared
with the weighted-sum path of the same optimizer in float64: both compute the same sums in a
different order (autograd's vs the ops'), so the parameters agree to a few ulps of their size
(1e-12 relative leaves a margin of ~10³ over float64 rounding); resume, the BatchNorm path,
non-finite batches and bad arguments."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowrank_kernels.optim import FNGD

import optim_reference as ref

pytestmark = pytest.mark.usefixtures("one_thread")

LAM = 0.05
SIZES = [6, 5, 6, 4, 7, 6]  # epoch 0 = the first 2 steps; 7 has a never-seen position


def _make(model, via, reduction="mean", reuse="mean", **kw):
    kw = {"momentum": 0.9, "weight_decay": 1e-3, **kw}
    return FNGD(model, lr=0.1, damping=LAM, steps_per_epoch=2, blocks="model", reuse=reuse,
                loss_reduction=reduction, reuse_via_backward=via, **kw)


def _train(model, opt, batches, reduction="mean"):
    for x, y in batches:
        F.cross_entropy(model(x), y, reduction=reduction).backward()
        opt.step()
        opt.zero_grad()


def _relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("reuse", ["mean", "per_step"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("make", [ref.mlp, ref.cnn], ids=["mlp", "cnn"])
def test_same_parameters_as_weighted_sum(make, reduction, reuse):
    """Epoch 0 (2 steps) then 4 reuse steps, momentum and weight decay: after every step the
    option's parameters equal the weighted-sum path's to 1e-12 relative; in its reuse steps
    the capture records nothing (its hooks are paused)."""
    model, twin = make(), make()
    opt, plain = _make(model, True, reduction, reuse), _make(twin, False, reduction, reuse)
    for k, B in enumerate(SIZES):
        x, y = ref.batch(model, B, 10 + k)
        reusing = not opt.computing()
        F.cross_entropy(model(x), y, reduction=reduction).backward()
        if reusing:
            with pytest.raises(RuntimeError, match="capture"):
                opt.capture.factors()  # nothing recorded in a fused step
        opt.step()
        opt.zero_grad()
        _train(twin, plain, [(x, y)], reduction)
        for (n, p), q in zip(model.named_parameters(), twin.parameters()):
            assert _relative(p.detach(), q.detach()) < 1e-12, (k, n)
    assert int(opt.state["fallbacks"]) == 0 and int(opt.state["skipped"]) == 0
    assert opt.state["weighted_sum_steps"] == 0


def test_direction_is_weighted_sum_of_per_sample_gradients():
    """lr = 1, no momentum: a reuse step moves θ by exactly Σ_i c_i g_i, c = w̄/B, with g_i
    from torch.func and w̄ the mean of the first-epoch weights (here one batch of 6)."""
    model = ref.mlp()
    opt = FNGD(model, lr=1.0, damping=LAM, steps_per_epoch=1, blocks="model",
               reuse_via_backward=True)
    _train(model, opt, [ref.batch(model, 6, 1)])
    x, y = ref.batch(model, 6, 2)
    with opt.capture.paused():
        grads = ref.per_sample_grads(model, x, y)
    stats = opt.state["coefficients"]["model"]
    c = stats["sum"] / stats["count"] / 6
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, opt, [(x, y)])
    for n, p in model.named_parameters():
        expect = torch.einsum("i,i...->...", c, grads[n])
        assert _relative(before[n] - p.detach(), expect) < 1e-12, n


def _bn_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(),
                         nn.Linear(7, 3)).double()


def test_batchnorm_in_train_mode_takes_weighted_sum_path():
    """Train-mode BatchNorm mixes the batch: those reuse steps take the weighted-sum path
    (bit-identical to the optimizer without the option) and are counted; in eval mode the
    BatchNorm is a per-sample affine map and the step goes through the backward again."""
    model, twin = _bn_mlp(), _bn_mlp()
    opt, plain = _make(model, True), _make(twin, False)
    batches = [ref.batch(ref.mlp(), B, 20 + k) for k, B in enumerate(SIZES)]
    _train(model, opt, batches[:4])
    _train(twin, plain, batches[:4])
    assert opt.state["weighted_sum_steps"] == 2
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    model.eval()
    twin.eval()
    _train(model, opt, batches[4:])
    _train(twin, plain, batches[4:])
    assert opt.state["weighted_sum_steps"] == 2
    for p, q in zip(model.parameters(), twin.parameters()):
        assert _relative(p.detach(), q.detach()) < 1e-12
    assert int(opt.state["fallbacks"]) == 0


@pytest.mark.parametrize("save_after", [1, 3], ids=["save-in-epoch-0", "save-reusing"])
@pytest.mark.parametrize("make", [ref.mlp, ref.cnn], ids=["mlp", "cnn"])
def test_resume_is_bit_for_bit(make, save_after):
    model = make(seed=0, dtype=torch.float32)
    batches = [ref.batch(model, B, 40 + k, torch.float32) for k, B in enumerate(SIZES)]
    opt = _make(model, True)
    _train(model, opt, batches[:save_after])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _train(model, opt, batches[save_after:])
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = make(seed=1, dtype=torch.float32)
    fresh.load_state_dict(saved["model"])
    opt2 = _make(fresh, True)
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
    opt = _make(model, True)
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
               reuse_via_backward=True, loss_reduction="sum")
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


def test_bad_arguments_and_outputs():
    model = ref.mlp()
    with pytest.raises(ValueError, match="reuse_via_backward.*blocks"):
        FNGD(model, lr=0.1, steps_per_epoch=2, reuse_via_backward=True)
    with pytest.raises(ValueError, match="reuse_via_backward"):
        FNGD(model, lr=0.1, steps_per_epoch=2, blocks="model", reuse_via_backward="yes")

    class NoTensor(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3).double()

        def forward(self, x):
            return {"hidden": self.fc(x).detach()}

    net = NoTensor()
    opt = FNGD(net, lr=0.1, steps_per_epoch=1, blocks="model", reuse_via_backward=True)
    x, y = ref.batch(ref.mlp(), 4, 3)
    F.cross_entropy(net.fc(x), y).backward()
    opt.step()
    opt.zero_grad()
    with pytest.raises(TypeError, match="reuse_via_backward"):
        net(x)
    with torch.no_grad():  # evaluation is untouched
        net(x)
    opt.close()


@pytest.mark.parametrize("wrap", ["tuple", "dict", "logits"])
def test_model_outputs_holding_the_batch_tensor(wrap):
    """A model returning a tuple, a dict or a ModelOutput-like dict with "logits" (as
    transformers models do): the hook goes on the batch tensor, the parameters equal the
    weighted-sum path's."""
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = ref.mlp()

        def forward(self, x):
            y = self.net(x)
            return {"tuple": lambda: (y, y.sum()), "dict": lambda: {"out": y},
                    "logits": lambda: {"loss": None, "logits": y}}[wrap]()

    def logits(out):
        return out[0] if wrap == "tuple" else out["out" if wrap == "dict" else "logits"]

    model, twin = Wrapped(), Wrapped()
    twin.load_state_dict(model.state_dict())
    opt, plain = _make(model, True), _make(twin, False)
    for k, B in enumerate(SIZES):
        x, y = ref.batch(model.net, B, 10 + k)
        for m, o in ((model, opt), (twin, plain)):
            F.cross_entropy(logits(m(x)), y).backward()
            o.step()
            o.zero_grad()
        for (n, p), q in zip(model.named_parameters(), twin.parameters()):
            assert _relative(p, q) < 1e-12, (wrap, k, n)
