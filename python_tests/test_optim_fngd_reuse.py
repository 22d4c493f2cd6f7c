"""FNGD's reuse step through the weighted backward (Capture.weighted): with lr = 1 and no
momentum a reuse step moves θ by exactly Σ_i c_i g_i, c the reused coefficients of each
block, g_i the per-sample gradients of the mean loss as Capture defines them. References,
float64:
  - train-mode BatchNorm / GroupNorm ResNet-like models: g_i = (1/s) ∂L/∂θ_i with θ_i sample
    i's own copy of each parameter (a per-sample perturbation φ_i (B, *shape) of every
    layer's parameters, added through the layer's own formula; autograd over φ at 0: the
    batch statistics stay the batch's — torch.func cannot run train-mode BatchNorm, which
    updates its running statistics in place);
  - a transformers GPT-2 (Conv1D, tied head, position table on (1, T) ids): torch.func.grad
    of each sample's own loss (python_tests/model_checks).
Only the order of summation differs (autograd's GEMMs vs einsum), so 1e-10 relative is
tight. Also: the input gradient and parameters outside the optimizer keep the plain
backward's gradient; a layer the weighting cannot take (torch.func fallback) is corrected."""
import pytest
import torch
import torch.nn.functional as F
from model_checks import per_sample_gradients
from torch import nn

from lowrank_kernels.capture import Capture
from lowrank_kernels.optim import FNGD

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
LAM = 0.05
TOL = 1e-10


class Block(nn.Module):
    def __init__(self, c_in, c_out, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False)
        self.bn1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, groups=c_out, bias=True)  # depthwise
        self.bn2 = norm(c_out)
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, 2, bias=False), norm(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetLike(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1, bias=False), norm(4), nn.ReLU())
        self.block = Block(4, 8, norm)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.block(self.stem(x)), 1).flatten(1))


NORMS = {"batchnorm": nn.BatchNorm2d, "groupnorm": lambda c: nn.GroupNorm(2, c)}


def _resnet(norm, seed=0):
    torch.manual_seed(seed)
    model = ResNetLike(NORMS[norm]).to(F64)
    with torch.no_grad():  # affine parameters away from (1, 0): every term is exercised
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def _images(B, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 6, 6, generator=g, dtype=F64), torch.randint(0, 3, (B,),
                                                                         generator=g)


def _delta(module, x, y, phi, B):
    """What sample i's own parameter copy θ + φ_i adds to module's output (linear in φ)."""
    if isinstance(module, nn.Linear):
        return torch.einsum("bi,boi->bo", x, phi["weight"]) + phi["bias"]
    if isinstance(module, nn.Conv2d):
        W = phi["weight"]
        out = F.conv2d(x.reshape(1, -1, *x.shape[2:]), W.reshape(-1, *W.shape[2:]), None,
                       module.stride, module.padding, module.dilation, module.groups * B)
        out = out.reshape(B, -1, *out.shape[2:])
        return out + phi["bias"][:, :, None, None] if "bias" in phi else out
    if isinstance(module, nn.BatchNorm2d):
        xhat = F.batch_norm(x, None, None, training=True, eps=module.eps)
    else:
        xhat = F.group_norm(x, module.num_groups, eps=module.eps)
    return xhat * phi["weight"][:, :, None, None] + phi["bias"][:, :, None, None]


def per_sample_shares(model, x, y):
    """{name: (B, *shape)}: g_i = B ∂L/∂θ_i of the mean loss L (s = 1/B), the gradient over
    per-sample perturbations φ_i of every parameter at φ = 0."""
    B = x.shape[0]
    owners = {n: m for n, m in model.named_modules() if any(True for _ in
                                                           m.parameters(recurse=False))}
    phi0 = {f"{mn}.{pn}": torch.zeros(B, *p.shape, dtype=F64)
            for mn, m in owners.items() for pn, p in m.named_parameters(recurse=False)}
    current = {}
    hooks = [m.register_forward_hook(
        lambda m, args, out, mn=mn: out + _delta(m, args[0], out, {
            pn: current[f"{mn}.{pn}"] for pn, _ in m.named_parameters(recurse=False)}, B))
        for mn, m in owners.items()]

    phi = {n: t.requires_grad_() for n, t in phi0.items()}
    current.update(phi)
    try:
        loss = F.cross_entropy(model(x), y)
    finally:
        for h in hooks:
            h.remove()
    grads = torch.autograd.grad(loss, list(phi.values()))
    return {n: B * g for n, g in zip(phi, grads)}


def _coefficients(opt, B):
    """{block name: c (B,)}: the reused c = w̄ / B (one first-epoch batch of the same B)."""
    return {name: (s["sum"] / s["count"]) / B for name, s in opt.state["coefficients"].items()}


def _check_update(model, opt, x, y, grads, B):
    coefficients = _coefficients(opt, B)
    block_of = {id(p): name for name, ps in opt.blocks for p in ps}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    for n, p in model.named_parameters():
        c = coefficients[block_of[id(p)]]
        expect = torch.einsum("i,i...->...", c, grads[n])
        error = float((before[n] - p.detach() - expect).norm() / expect.norm())
        assert error < TOL, (n, error)
    assert int(opt.state["fallbacks"]) == 0 and int(opt.state["skipped"]) == 0
    assert opt.state["weighted_sum_steps"] == 0


@pytest.mark.parametrize("blocks", ["layer", "model"])
@pytest.mark.parametrize("norm", NORMS)
def test_reuse_step_is_weighted_sum_of_per_sample_gradients(norm, blocks):
    """Train mode (BatchNorm on batch statistics): the reuse step equals Σ_i c_i g_i."""
    model = _resnet(norm)
    opt = FNGD(model, lr=1.0, damping=LAM, steps_per_epoch=1, blocks=blocks)
    x, y = _images(6, 1)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    x, y = _images(6, 2)
    with opt.capture.paused():
        grads = per_sample_shares(model, x, y)
    _check_update(model, opt, x, y, grads, 6)


def test_reference_shares_sum_to_the_gradient():
    """The oracle itself: s·Σ_i g_i = ∇L (BatchNorm in train mode), to rounding (at the
    model's gradient scale: a bias before a BatchNorm has gradient 0 by symmetry)."""
    model = _resnet("batchnorm")
    x, y = _images(5, 3)
    grads = per_sample_shares(model, x, y)
    F.cross_entropy(model(x), y).backward()
    scale = sum(float(p.grad.norm()) ** 2 for p in model.parameters()) ** 0.5
    for n, p in model.named_parameters():
        assert float((grads[n].mean(0) - p.grad).norm()) < 1e-12 * scale, n
        assert float(grads[n].norm()) > 1e-3 * scale, n  # the shares themselves are not 0


def test_input_gradient_and_other_parameters_untouched():
    """In a reuse step the input's gradient is the plain backward's, and a parameter the
    optimizer does not hold keeps its plain gradient (train-mode BatchNorm model)."""
    model, twin = _resnet("batchnorm"), _resnet("batchnorm")
    held = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
    opt = FNGD(held, lr=0.1, damping=LAM, steps_per_epoch=1, capture=Capture(model, keep=True))
    x, y = _images(6, 4)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    model.zero_grad()  # the optimizer's zero_grad leaves fc, which it does not hold
    twin.load_state_dict(model.state_dict())
    x, y = _images(6, 5)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    F.cross_entropy(model(xa), y).backward()
    F.cross_entropy(twin(xb), y).backward()
    assert float((xa.grad - xb.grad).norm() / xb.grad.norm()) < 1e-12
    for n in ("fc.weight", "fc.bias"):
        a, b = model.get_parameter(n).grad, twin.get_parameter(n).grad
        assert float((a - b).norm() / b.norm()) < 1e-12, n
    opt.step()
    assert opt.state["weighted_sum_steps"] == 0
    opt.close()


def _gpt2():
    transformers = pytest.importorskip(
        "transformers", reason="transformers is a test-only dependency (scripts/install.sh)")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=8, vocab_size=20,
                                  bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).to(F64).eval()


def _lm_losses(model, ids):
    logits = model(input_ids=ids).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 20), ids[:, 1:].reshape(-1),
                         reduction="none")
    return ce.reshape(ids.shape[0], -1).mean(1)


@pytest.mark.parametrize("blocks", ["layer", "model"])
def test_gpt2_reuse_step(blocks):
    """transformers GPT-2 (Conv1D, LayerNorm, tied wte / lm_head, wpe on (1, T) position
    ids): the reuse step equals Σ_i c_i g_i with g_i = ∇ℓ_i per sample."""
    model = _gpt2()
    opt = FNGD(model, lr=1.0, damping=LAM, steps_per_epoch=1, blocks=blocks)
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(1, 20, (4, 6), generator=g) for _ in range(2)]
    _lm_losses(model, ids[0]).mean().backward()
    opt.step()
    opt.zero_grad()
    with opt.capture.paused():
        grads = per_sample_gradients(model, _lm_losses, (ids[1],), 4)
    coefficients = _coefficients(opt, 4)
    block_of = {id(p): name for name, ps in opt.blocks for p in ps}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _lm_losses(model, ids[1]).mean().backward()
    opt.step()
    for n, p in model.named_parameters():
        expect = torch.einsum("i,i...->...", coefficients[block_of[id(p)]], grads[n])
        error = float((before[n] - p.detach() - expect).norm() / max(float(expect.norm()),
                                                                      1e-300))
        assert error < TOL, (n, error)
    assert opt.state["weighted_sum_steps"] == 0 and int(opt.state["fallbacks"]) == 0


class _Squared(nn.Module):
    """A module the capture has no kernel for: y = x ⊙ w² (the torch.func fallback)."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=F64))

    def forward(self, x):
        return x * self.w ** 2


def test_fallback_layer_is_corrected_once_with_a_warning():
    """A torch.func-fallback layer is recorded instead of weighted; step() corrects its part
    (U_call (c − s·1)): the update is still Σ_i c_i g_i, and a warning says so once."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), _Squared(7), nn.Linear(7, 3)).to(F64)
    with pytest.warns(UserWarning, match="fallback"):
        opt = FNGD(model, lr=1.0, damping=LAM, steps_per_epoch=1, blocks="model",
                   fallback=True)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 5, generator=g, dtype=F64), torch.randint(0, 3, (6,),
                                                                        generator=g))
               for _ in range(3)]
    x, y = batches[0]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()

    def losses(m, x, y):
        return F.cross_entropy(m(x), y, reduction="none")

    for k, (x, y) in enumerate(batches[1:]):
        with opt.capture.paused():
            grads = per_sample_gradients(model, losses, (x, y), 6)
        if k == 0:
            with pytest.warns(UserWarning, match="could not be weighted"):
                _check_update(model, opt, x, y, grads, 6)
        else:
            _check_update(model, opt, x, y, grads, 6)
