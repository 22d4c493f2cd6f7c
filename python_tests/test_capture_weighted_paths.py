"""Capture.weighted's backward paths, float64, against an independent reference: with
per-parameter weights w_p (B,) — a weight and its bias weighted differently — the backward
leaves p.grad = Σ_i w_p,i ∂L/∂θ_i (θ_i sample i's own copy of the parameters: autograd over
per-sample perturbations φ_i at 0, added through each layer's own formula), and the input
gradient is the plain backward's. Paths: Conv2d with bias (one convolution_backward with
x's rows scaled), a Conv2d whose weight is frozen (bias only, input gradient still
needed), the first layer (no input gradient), BatchNorm in train and eval mode and GroupNorm
(per-sample sums of the batch viewed as one sample), LayerNorm with and without a bias
(1/σ scaled per row), Linear on tokens (strided: the Function's path; contiguous: the
plain node's, with x swapped for x ⊙ w). A second call of the same model takes the norms'
node hooks (learned on the first call): `later-call` checks those.""" 
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowrank_kernels import _C
from lowrank_kernels.capture import Capture

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
TOL = 1e-11


class Net(nn.Module):
    def __init__(self, ln_bias, contiguous=False):
        super().__init__()
        self.contiguous = contiguous
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2.weight.requires_grad_(False)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(4, bias=ln_bias)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.gn(self.conv2(F.relu(self.bn(self.conv1(x))))))
        tokens = h.flatten(2).transpose(1, 2)  # (B, T, 4)
        if self.contiguous:
            tokens = tokens.contiguous()
        return self.fc(self.ln(tokens)).mean(1)


def _net(ln_bias, train_bn, contiguous=False):
    torch.manual_seed(0)
    model = Net(ln_bias, contiguous).to(F64)
    with torch.no_grad():  # affine parameters and running statistics away from (1, 0)
        for m in (model.bn, model.gn, model.ln):
            m.weight.uniform_(0.5, 1.5)
            if m.bias is not None:
                m.bias.uniform_(-0.5, 0.5)
        model.bn.running_mean.uniform_(-0.3, 0.3)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.train(train_bn)


def _delta(module, x, phi, B):
    """What sample i's own parameter copy θ + φ_i adds to module's output (linear in φ)."""
    if isinstance(module, nn.Linear):
        return torch.einsum("bti,boi->bto", x, phi["weight"]) + phi["bias"][:, None]
    if isinstance(module, nn.Conv2d):
        out = 0
        if "weight" in phi:
            W = phi["weight"]
            out = F.conv2d(x.reshape(1, -1, *x.shape[2:]), W.reshape(-1, *W.shape[2:]), None,
                           module.stride, module.padding, module.dilation, B)
            out = out.reshape(B, -1, *out.shape[2:])
        return out + phi["bias"][:, :, None, None]
    if isinstance(module, nn.LayerNorm):
        xhat = F.layer_norm(x, module.normalized_shape, eps=module.eps)
        out = xhat * phi["weight"][:, None]
        return out + phi["bias"][:, None] if "bias" in phi else out
    if isinstance(module, nn.BatchNorm2d):
        xhat = (F.batch_norm(x, None, None, training=True, eps=module.eps) if module.training
                else F.batch_norm(x, module.running_mean, module.running_var, training=False,
                                  eps=module.eps))
    else:
        xhat = F.group_norm(x, module.num_groups, eps=module.eps)
    return xhat * phi["weight"][:, :, None, None] + phi["bias"][:, :, None, None]


def _shares(model, x, y):
    """{name: ∂L/∂θ_i (B, *shape)} of L = mean_i ℓ_i: the gradient over φ at φ = 0."""
    B = x.shape[0]
    phi, hooks = {}, []
    for mn, m in model.named_modules():
        own = {pn: torch.zeros(B, *p.shape, dtype=F64, requires_grad=True)
               for pn, p in m.named_parameters(recurse=False) if p.requires_grad}
        if own:
            phi.update({f"{mn}.{pn}": t for pn, t in own.items()})
            hooks.append(m.register_forward_hook(
                lambda m, args, out, own=own: out + _delta(m, args[0], own, B)))
    try:
        loss = F.cross_entropy(model(x), y)
    finally:
        for h in hooks:
            h.remove()
    return dict(zip(phi, torch.autograd.grad(loss, list(phi.values()))))


@pytest.mark.parametrize("pieces", ["native", "python"])
@pytest.mark.parametrize("call", ["first-call", "later-call"])
@pytest.mark.parametrize("contiguous", [False, True], ids=["strided-tokens", "contiguous-tokens"])
@pytest.mark.parametrize("ln_bias", [True, False], ids=["ln-bias", "ln-no-bias"])
@pytest.mark.parametrize("train_bn", [True, False], ids=["bn-train", "bn-eval"])
def test_weighted_backward_matches_per_sample_reference(train_bn, ln_bias, contiguous, call,
                                                        pieces, monkeypatch):
    """pieces="python": without the extension's C++ nodes and norm hooks (as on a device or
    dtype they do not take): the saved-tensor swap, the Python norm post-hooks and the
    batch-norm-backward form of the channel sums."""
    if pieces == "python":
        from lowrank_kernels.capture import _weighted_hooks

        monkeypatch.setattr(_weighted_hooks, "NATIVE", None)
    B = 5
    model = _net(ln_bias, train_bn, contiguous)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, 4, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (B,), generator=g)
    names = {id(p): n for n, p in model.named_parameters()}
    w = {n: torch.rand(B, generator=g, dtype=F64) + 0.5 for n in names.values()}
    weights = lambda b: {i: w[n] for i, n in names.items()}  # noqa: E731

    plain, reference = copy.deepcopy(model), copy.deepcopy(model)
    with Capture(model) as cap:
        if call == "later-call":  # a first weighted step (the running statistics move)
            first = torch.randn(B, 3, 4, 4, generator=g, dtype=F64)
            with cap.weighted(weights):
                out = model(first)
            F.cross_entropy(out, y).backward()
            cap.release()
            model.zero_grad(set_to_none=True)
            with torch.no_grad():
                plain(first), reference(first)
            assert {id(m) for m in (model.bn, model.gn, model.ln)} <= cap._native_norms
        xw = x.clone().requires_grad_()
        with cap.weighted(weights):
            out = model(xw)
        F.cross_entropy(out, y).backward()
        assert not cap.recorded  # every call went through the weighting
    xp = x.clone().requires_grad_()
    F.cross_entropy(plain(xp), y).backward()
    shares = _shares(reference, x, y)

    assert float((xw.grad - xp.grad).norm() / xp.grad.norm()) < TOL
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None
            continue
        expect = torch.einsum("i,i...->...", w[n], shares[n])
        assert float((p.grad - expect).norm() / expect.norm()) < TOL, n
    for a, b in zip(model.buffers(), plain.buffers()):  # running statistics as the plain's
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("shape, stats", [((6, 8, 5, 3), (1, 8)), ((6, 8, 5, 3), (6, 2)),
                                          ((6, 8), (1, 8)), ((3, 4, 17), (3, 4))],
                         ids=["batch-norm", "group-norm", "batch-norm-1d", "rows-of-17"])
def test_norm_affine_sums_against_float64(dtype, shape, stats):
    """The C++ weighted affine gradients of the weighted BatchNorm / GroupNorm backward:
    Σ_n w_n Σ_k g (x − μ_s) σ_s⁻¹ and Σ_n wb_n Σ_k g per channel, s the statistics' (sample,
    group), against float64 sums of x̂ formed explicitly; a strided g is read as its values."""
    g_ = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g_, dtype=F64) * 3 + 5
    g = torch.randn(shape, generator=g_, dtype=F64)
    mean = torch.randn(stats, generator=g_, dtype=F64) + 5
    invstd = torch.rand(stats, generator=g_, dtype=F64) + 0.5
    B, C = shape[:2]
    w, wb = torch.randn(B, generator=g_, dtype=F64), torch.randn(B, generator=g_, dtype=F64)
    per = C // stats[1]
    m = mean.repeat_interleave(per, 1).expand(B, C).reshape(B, C, *([1] * (len(shape) - 2)))
    s = invstd.repeat_interleave(per, 1).expand(B, C).reshape(m.shape)
    expect_w = w @ (g * (x - m) * s).reshape(B, C, -1).sum(2)
    expect_b = wb @ g.reshape(B, C, -1).sum(2)
    strided = g.to(dtype).transpose(0, 1).contiguous().transpose(0, 1)
    got_w, got_b = _C.capture_norm_affine_sums(
        strided, x.to(dtype), mean.to(dtype), invstd.to(dtype), w.to(dtype), wb)
    tol = 1e-5 if dtype == torch.float32 else 1e-13
    for got, expect in ((got_w, expect_w), (got_b, expect_b)):
        assert got.dtype == dtype and got.shape == (C,)
        assert float((got.double() - expect).norm() / expect.norm()) < tol


def test_norm_affine_sums_rejects_bad_shapes():
    x, w = torch.randn(4, 6, 3), torch.ones(4)
    op = _C.capture_norm_affine_sums
    with pytest.raises(RuntimeError, match="mean and invstd must be"):
        op(x, x, torch.zeros(1, 4), torch.ones(1, 4), w, w)
    with pytest.raises(RuntimeError, match="one shape"):
        op(x, x[:2], torch.zeros(1, 6), torch.ones(1, 6), w, w)
    with pytest.raises(RuntimeError, match="w and wb must be"):
        op(x, x, torch.zeros(1, 6), torch.ones(1, 6), w[:3], w)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("B, T, D", [(4, 64, 128), (3, 5, 17), (1, 1, 3), (6, 2, 700)],
                         ids=["tokens", "odd", "one-row", "wide"])
def test_layer_norm_affine_sums_against_float64(dtype, B, T, D):
    """The C++ weighted sums of the weighted LayerNorm backward, rows r of sample r / T:
    Σ_r a_i rstd_r g_r (x_r − mean_r) and Σ_r b_i g_r, against float64 sums of x̂ formed
    explicitly; a strided g is read as its values; the wide case spans several column
    ranges of the threads."""
    g_ = torch.Generator().manual_seed(3)
    R = B * T
    x = torch.randn(R, D, generator=g_, dtype=F64) * 3 + 5
    g = torch.randn(R, D, generator=g_, dtype=F64)
    mean = torch.randn(R, generator=g_, dtype=F64) + 5
    rstd = torch.rand(R, generator=g_, dtype=F64) + 0.5
    a, b = torch.randn(B, generator=g_, dtype=F64), torch.randn(B, generator=g_, dtype=F64)
    rows = torch.arange(R) // T
    expect_w = (a[rows, None] * rstd[:, None] * g * (x - mean[:, None])).sum(0)
    expect_b = (b[rows, None] * g).sum(0)
    strided = g.to(dtype).T.contiguous().T
    got_w, got_b = _C.capture_layer_norm_affine_sums(
        strided, *(t.to(dtype) for t in (x, mean, rstd, a, b)))
    tol = 1e-5 if dtype == torch.float32 else 1e-13
    for got, expect in ((got_w, expect_w), (got_b, expect_b)):
        assert got.dtype == dtype and got.shape == (D,)
        assert float((got.double() - expect).norm() / expect.norm()) < tol


def test_layer_norm_affine_sums_rejects_bad_shapes():
    x = torch.randn(8, 5)
    op = _C.capture_layer_norm_affine_sums
    with pytest.raises(RuntimeError, match="one shape"):
        op(x, x[:4], torch.zeros(8), torch.ones(8), torch.ones(2), torch.ones(2))
    with pytest.raises(RuntimeError, match="mean and rstd must have R = 8"):
        op(x, x, torch.zeros(4), torch.ones(8), torch.ones(2), torch.ones(2))
    with pytest.raises(RuntimeError, match="B dividing R"):
        op(x, x, torch.zeros(8), torch.ones(8), torch.ones(3), torch.ones(3))
    with pytest.raises(RuntimeError, match="one dtype"):
        op(x, x.double(), torch.zeros(8), torch.ones(8), torch.ones(2), torch.ones(2))


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("bias, shape", [(True, (3, 4, 5)), (False, (3, 4, 5)),
                                         (True, (4, 5)), (True, (2, 3, 2, 5))],
                         ids=["tokens", "no-bias", "rows", "two-token-dims"])
def test_weighted_linear_node_against_float64(transposed, bias, shape):
    """The C++ node of a Linear / Conv1D call in a weighted backward: the forward is the
    layer's (x Wᵀ + b, or x W + b), the backward gives the plain input gradient g W (g Wᵀ),
    Σ_i w_i Σ_t g_it x_itᵀ and Σ_i wb_i Σ_t g_it, formed here explicitly per sample."""
    g_ = torch.Generator().manual_seed(4)
    B, d_in, d_out = shape[0], shape[-1], 6
    x = torch.randn(shape, generator=g_, dtype=F64, requires_grad=True)
    W = torch.randn((d_in, d_out) if transposed else (d_out, d_in), generator=g_, dtype=F64,
                    requires_grad=True)
    b = torch.randn(d_out, generator=g_, dtype=F64, requires_grad=True) if bias else None
    w, wb = torch.randn(B, generator=g_, dtype=F64), torch.randn(B, generator=g_, dtype=F64)
    y = _C.capture_weighted_linear(x, W, b, w, wb, transposed)
    Wm = W if transposed else W.T  # y = x Wm + b
    expect_y = x @ Wm + (b if bias else 0)
    assert float((y - expect_y).abs().max()) < 1e-13
    g = torch.randn(y.shape, generator=g_, dtype=F64)
    y.backward(g)
    xs, gs = x.detach().reshape(B, -1, d_in), g.reshape(B, -1, d_out)
    per_sample = torch.einsum("bti,bto->bio", xs, gs)  # ∂(x Wm)/∂Wm per sample
    expect_W = torch.einsum("b,bio->io", w, per_sample)
    close = lambda got, expect: float((got - expect).norm() / expect.norm()) < TOL
    assert close(W.grad, expect_W if transposed else expect_W.T)
    assert close(x.grad, g @ Wm.T.detach())
    if bias:
        assert close(b.grad, torch.einsum("b,bto->o", wb, gs))


def test_weighted_linear_node_rejects_bad_shapes():
    op = _C.capture_weighted_linear
    x, W, w = torch.randn(3, 4, 5), torch.randn(6, 5), torch.ones(3)
    with pytest.raises(RuntimeError, match="x must be"):
        op(x, W.T, None, w, w, False)
    with pytest.raises(RuntimeError, match="w and wb must be"):
        op(x, W, None, torch.ones(2), torch.ones(2), False)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("geometry", [((1, 1), (1, 1), (1, 1), 1), ((2, 1), (0, 2), (1, 2), 2),
                                      ((2, 2), (1, 0), (1, 1), 4)],
                         ids=["same", "strided-dilated-groups", "depthwise"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_weighted_conv2d_node_against_float64(bias, geometry, channels_last):
    """The C++ node of a Conv2d call in a weighted backward: the forward is F.conv2d's, the
    backward gives the plain input gradient, Σ_i w_i ∂W_i and Σ_i wb_i ∂b_i, with ∂W_i, ∂b_i
    sample i's own gradients of ⟨g_i, conv2d(x_i, W, b)⟩ (autograd per sample)."""
    stride, padding, dilation, groups = geometry
    g_ = torch.Generator().manual_seed(5)
    B, C_in, C_out = 3, 4, 8
    x = torch.randn(B, C_in, 7, 6, generator=g_, dtype=F64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    W = torch.randn(C_out, C_in // groups, 3, 2, generator=g_, dtype=F64, requires_grad=True)
    b = torch.randn(C_out, generator=g_, dtype=F64, requires_grad=True) if bias else None
    w, wb = torch.randn(B, generator=g_, dtype=F64), torch.randn(B, generator=g_, dtype=F64)
    y = _C.capture_weighted_conv2d(x, W, b, w, wb, stride, padding,
                                                          dilation, groups)
    conv = lambda xs, Ws, bs: F.conv2d(xs, Ws, bs, stride, padding, dilation, groups)  # noqa: E731
    assert float((y - conv(x, W, b)).abs().max()) < 1e-13
    g = torch.randn(y.shape, generator=g_, dtype=F64)
    y.backward(g)
    expect_W, expect_b = torch.zeros_like(W), torch.zeros(C_out, dtype=F64)
    Wd = W.detach().requires_grad_()
    bd = torch.zeros(C_out, dtype=F64, requires_grad=True)
    for i in range(B):
        dW, db = torch.autograd.grad((g[i:i + 1] * conv(x[i:i + 1].detach(), Wd, bd)).sum(),
                                     (Wd, bd))
        expect_W += w[i] * dW
        expect_b += wb[i] * db
    xr = x.detach().clone().requires_grad_()
    conv(xr, W.detach(), None).backward(g)
    close = lambda got, expect: float((got - expect).norm() / expect.norm()) < TOL  # noqa: E731
    assert close(W.grad, expect_W)
    assert close(x.grad, xr.grad)
    if bias:
        assert close(b.grad, expect_b)


def test_weighted_conv2d_node_rejects_bad_shapes():
    op = _C.capture_weighted_conv2d
    x, W, w = torch.randn(3, 4, 5, 5), torch.randn(6, 4, 3, 3), torch.ones(3)
    with pytest.raises(RuntimeError, match="x must be"):
        op(x[0], W, None, w, w, [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match="w and wb must be"):
        op(x, W, None, torch.ones(2), torch.ones(2), [1, 1], [0, 0], [1, 1], 1)


def test_weighted_norm_calls_leave_nothing_behind():
    """After a weighted step's backward nothing of its norm calls survives: their node hooks
    keep the node's statistics detached (each is an output of the node; kept with the node as
    its grad_fn by the node's own hook, it would be a cycle through C++ that no garbage
    collection frees: the whole graph and its activations, every step)."""
    import gc

    from lowrank_kernels.capture._weighted import _NativeNorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4),
                          nn.Flatten(2), nn.LayerNorm(4), nn.Flatten(), nn.Linear(16, 3)).to(F64)
    x = torch.randn(5, 3, 4, 4, dtype=F64)
    weights = lambda B: {id(p): torch.rand(B, dtype=F64) for p in model.parameters()}  # noqa: E731
    with Capture(model) as cap:
        for _ in range(3):  # the first call learns the norms' nodes, the later ones hook them
            with cap.weighted(weights):
                out = model(x)
            out.square().sum().backward()
            cap.release()
            model.zero_grad(set_to_none=True)
        assert {id(m) for m in model if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm,
                                                       nn.LayerNorm))} <= cap._native_norms
        del out
        gc.collect()
        assert not [o for o in gc.get_objects() if isinstance(o, _NativeNorm)]


def test_capture_entry_points_reject_bad_arguments():
    """The vectorcall entry points of the capture's C++ pieces name what is wrong: the count,
    an argument that is not a tensor, a geometry that is not a tuple or list of ints."""
    x, W, w = torch.randn(3, 4, 5, 5), torch.randn(6, 4, 3, 3), torch.ones(3)
    with pytest.raises(TypeError, match="takes 9 arguments, got 8"):
        _C.capture_weighted_conv2d(x, W, None, w, w, (1, 1), (0, 0), (1, 1))
    with pytest.raises(TypeError, match="argument 1 must be a tensor"):
        _C.capture_weighted_conv2d(x, "W", None, w, w, (1, 1), (0, 0), (1, 1), 1)
    with pytest.raises(TypeError, match="argument 5 must be a tuple or list of ints"):
        _C.capture_weighted_conv2d(x, W, None, w, w, 1, (0, 0), (1, 1), 1)
    with pytest.raises(TypeError, match="argument 6 must be a tuple or list of ints"):
        _C.capture_weighted_conv2d(x, W, None, w, w, (1, 1), (0.5, 0), (1, 1), 1)
    with pytest.raises(TypeError, match="takes 6 arguments"):
        _C.capture_norm_affine_sums(x, x, w)
    y = torch.randn(3, 4, requires_grad=True) * 2  # a node that is no norm's: not hooked
    assert _C.capture_hook_norm_affine(y, y, w, w, 1, 2) is False
