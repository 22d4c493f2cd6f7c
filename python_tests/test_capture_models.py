"""Capture on real models (an MLP, a small CNN, a tiny transformer with tied embeddings)
against per-sample gradients from torch.func (vmap(grad)) in float64: whole-model, per-module
and per-parameter Grams, the diagonal, cross-Grams of two batches, weighted sums (returned and
written to .grad) and projections; mean, sum and token-mean loss reductions; batch sizes 1 and
odd. The models and the oracle are shared with test_capture_api.py."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowrank_kernels.capture import Capture

F64 = torch.float64


# ---- models -------------------------------------------------------------------------------

class MLP(nn.Module):
    """Linear layers (one called twice: weight sharing), in-place ReLU, LayerNorm."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 7)
        self.shared = nn.Linear(7, 7)
        self.norm = nn.LayerNorm(7)
        self.out = nn.Linear(7, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = self.shared(torch.relu_(self.shared(h)))
        return self.out(self.norm(h))


class SmallCNN(nn.Module):
    """Strided, padded, dilated, grouped, 'same' (even kernel) and circular-padded convs, a 1×1
    conv called twice, BatchNorm2d, GroupNorm, BatchNorm1d, a Linear head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False)
        self.gn = nn.GroupNorm(3, 6)
        self.c3 = nn.Conv2d(6, 6, (2, 3), padding="same")
        self.c4 = nn.Conv2d(6, 4, 3, stride=(1, 2), padding=1, padding_mode="circular")
        self.shared = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x, apply=None):
        apply = apply or (lambda module, h: module(h))
        h = torch.relu(apply(self.bn1, apply(self.c1, x)))
        h = torch.tanh(apply(self.gn, apply(self.c2, h)))
        h = apply(self.c4, torch.relu(apply(self.c3, h)))
        h = apply(self.shared, torch.tanh(apply(self.shared, h)))
        return apply(self.fc, apply(self.bn2, h.mean((2, 3))))


class TinyTransformer(nn.Module):
    """Token (padding_idx) and position embeddings, LayerNorm, causal attention with q/k/v/o
    projections, RMSNorm, an MLP, a bias-free final LayerNorm, output weight tied to the token
    embedding."""

    def __init__(self, vocab=11, d=8, heads=2, T=6):
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(T, d)
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=b)
                                          for b in (True, False, True, True))
        self.ln2 = nn.RMSNorm(d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx):
        B, T = idx.shape
        h = self.tok(idx) + self.pos(torch.arange(T, device=idx.device).expand(B, T))
        a = self.ln1(h)
        split = lambda y: y.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(a)), split(self.k(a)), split(self.v(a))
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
        att = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v
        h = h + self.o(att.transpose(1, 2).flatten(2))
        h = h + self.down(F.gelu(self.up(self.ln2(h))))
        return self.head(self.ln_f(h))


def make(name, dtype=F64, seed=0):
    torch.manual_seed(seed)
    model = {"mlp": MLP, "cnn": SmallCNN, "transformer": TinyTransformer}[name]().to(F64)
    with torch.no_grad():  # non-trivial norm affine parameters and running statistics
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm1d,
                              nn.BatchNorm2d)):
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    if name == "cnn":
        model.eval()  # running statistics: samples independent (train mode: see its test)
    return model.to(dtype)  # the float64 model rounded: the same model in every dtype


def batch(name, B, dtype=F64, seed=1):
    g = torch.Generator().manual_seed(seed)
    if name == "transformer":
        idx = torch.randint(0, 11, (B, 6), generator=g)
        idx[:, -2] = 0  # padding tokens
        return idx, torch.randint(0, 11, (B, 6), generator=g)
    shape = (B, 5) if name == "mlp" else (B, 3, 7, 8)
    return torch.randn(shape, generator=g, dtype=F64).to(dtype), torch.randint(0, 3, (B,),
                                                                                generator=g)


def sample_loss(name, out, target):
    """ℓ_i: cross-entropy (summed over tokens for the transformer), one value per sample."""
    if name == "transformer":
        return F.cross_entropy(out.transpose(1, 2), target, reduction="none").sum(1)
    return F.cross_entropy(out, target, reduction="none")


# ---- oracle -------------------------------------------------------------------------------

def per_sample_grads(model, name, x, target):
    """{parameter name: (B, *shape)} = ∇ℓ_i from torch.func (trainable parameters only)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss(p, xi, ti):
        return sample_loss(name, torch.func.functional_call(model, p, (xi[None],)), ti[None])[0]

    return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, target)


@functools.cache
def oracle(name, B, seed=1, dtype=F64):
    """per_sample_grads of make(name, dtype) on batch(name, B, seed) (computed once)."""
    x, t = batch(name, B, dtype, seed)
    return per_sample_grads(make(name, dtype), name, x, t)


def flat(grads):
    return torch.cat([g.flatten(1) for g in grads.values()], 1)


def run_capture(model, name, x, target, reduction="mean", **kw):
    """Forward and backward of the batch inside a Capture(keep=True); returns the capture."""
    model.zero_grad()
    cap = Capture(model, loss_reduction=reduction, keep=True, **kw)
    with cap:
        losses = sample_loss(name, model(x), target)
        if reduction == "mean":
            losses.mean().backward()
        elif reduction == "sum":
            losses.sum().backward()
        else:
            (losses.sum() * reduction).backward()
    return cap


def close(actual, expected, what=""):
    """float64 against float64: a relative error at the level of float64 rounding."""
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12 * max(scale, 1e-30),
                               msg=lambda m: f"{what}: {m}")


MODELS = ["mlp", "cnn", "transformer"]


# ---- Gram ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("B", [1, 5])
def test_gram_whole_model_diagonal_and_per_layer(name, B):
    model = make(name)
    x, t = batch(name, B)
    grads = oracle(name, B)
    U = flat(grads)
    cap = run_capture(model, name, x, t, backend="reference")
    close(cap.gram(), U @ U.T, f"{name} K")
    close(cap.gram(diagonal=True), (U * U).sum(1), f"{name} diag K")
    per_param = cap.gram(by="parameter")
    assert set(per_param) == set(grads)
    for pname, G in grads.items():
        close(per_param[pname], G.flatten(1) @ G.flatten(1).T, f"{name} {pname}")
    per_module = cap.gram(by="module")
    for module_name, K in per_module.items():
        G = torch.cat([g.flatten(1) for n, g in grads.items()
                       if n.rsplit(".", 1)[0] == module_name], 1)
        close(K, G @ G.T, f"{name} module {module_name}")
    close(sum(per_module.values()), U @ U.T, f"{name} Σ modules")
    for module_name, D in cap.gram(by="module", diagonal=True).items():
        close(D, per_module[module_name].diagonal(), f"{name} module {module_name} diagonal")
    cap.release()


@pytest.mark.parametrize("name", MODELS)
def test_cross_gram_of_two_batches(name):
    model = make(name)
    (x1, t1), (x2, t2) = batch(name, 3, seed=1), batch(name, 4, seed=2)
    U1, U2 = flat(oracle(name, 3, 1)), flat(oracle(name, 4, 2))
    cap1 = run_capture(model, name, x1, t1, backend="reference")
    cap2 = run_capture(model, name, x2, t2, backend="reference")
    close(cap1.gram(cap2), U1 @ U2.T, f"{name} cross")
    close(cap2.gram(cap1), U2 @ U1.T, f"{name} cross, swapped")
    x3, t3 = batch(name, 3, seed=3)
    U3 = flat(oracle(name, 3, 3))
    cap3 = run_capture(model, name, x3, t3, backend="reference")
    close(cap1.gram(cap3, diagonal=True), (U1 * U3).sum(1), f"{name} cross diagonal")


@pytest.mark.parametrize("name", ["transformer", "cnn"])
def test_cross_gram_of_batches_of_different_lengths(name):
    """Sequences of 6 and 4 tokens, images of 7×8 and 9×5 pixels: the ops' cross-Grams need
    equal token counts, so these pairs go through the projection route."""
    model = make(name)
    x1, t1 = batch(name, 3, seed=1)
    x2, t2 = batch(name, 4, seed=2)
    if name == "transformer":
        x2, t2 = x2[:, :4], t2[:, :4]
    else:
        x2 = torch.randn(4, 3, 9, 5, generator=torch.Generator().manual_seed(4), dtype=F64)
    U1 = flat(oracle(name, 3, 1))
    U2 = flat(per_sample_grads(model, name, x2, t2))
    cap1 = run_capture(model, name, x1, t1, backend="reference")
    cap2 = run_capture(model, name, x2, t2, backend="reference")
    close(cap1.gram(cap2), U1 @ U2.T, f"{name} cross, different lengths")


@pytest.mark.parametrize("reduction", ["sum", "mean", 1 / 42])
def test_loss_reductions_give_unscaled_per_sample_gradients(reduction):
    model = make("transformer")
    x, t = batch("transformer", 7)  # 7 samples × 6 tokens: 1/42 is a token mean
    U = flat(oracle("transformer", 7))
    cap = run_capture(model, "transformer", x, t, reduction, backend="reference")
    close(cap.gram(), U @ U.T, f"reduction {reduction}")


# ---- weighted sums and projections ---------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_weighted_sums_and_grad(name):
    model = make(name)
    B = 5
    x, t = batch(name, B)
    grads = oracle(name, B)
    cap = run_capture(model, name, x, t, backend="reference")
    by_name = dict(model.named_parameters())
    # Σ_i g_i / B is the gradient backward left in .grad (mean reduction).
    backward_grads = {n: p.grad.clone() for n, p in by_name.items()}
    mean = cap.weighted_sum(torch.full((B,), 1.0 / B, dtype=F64))
    for pname, p in by_name.items():
        close(mean[p], backward_grads[pname], f"{name} U 1/B vs .grad of {pname}")
    c = torch.randn(B, dtype=F64)
    C = torch.randn(B, 3, dtype=F64)
    single, multi = cap.weighted_sum(c), cap.weighted_sum(C)
    for pname, G in grads.items():
        p = by_name[pname]
        close(single[p], torch.einsum("b...,b->...", G, c), f"{name} U c {pname}")
        close(multi[p], torch.einsum("b...,bm->m...", G, C), f"{name} U C {pname}")
    cap.weighted_sum(c, write_grad=True)
    for pname, G in grads.items():
        close(by_name[pname].grad, torch.einsum("b...,b->...", G, c), f"{name} .grad {pname}")


@pytest.mark.parametrize("name", MODELS)
def test_projections(name):
    model = make(name)
    x, t = batch(name, 5)
    U = flat(oracle(name, 5))
    cap = run_capture(model, name, x, t, backend="reference")
    params = [p for p in model.parameters()]
    g = torch.Generator().manual_seed(7)
    Vs = [{p: torch.randn(p.shape, generator=g, dtype=F64) for p in params} for _ in range(3)]
    flat_V = torch.stack([torch.cat([V[p].flatten() for p in params]) for V in Vs])  # 3 × D
    close(cap.project(Vs[0]), U @ flat_V[0], f"{name} Uᵀ v")
    close(cap.project(Vs), U @ flat_V.T, f"{name} Uᵀ V")


# ---- BatchNorm in train mode: each sample's share of the batch gradient ----------------------

def per_sample_copy_grads(model, x, target):
    """g_i = ∂L/∂θ_i where sample i runs through its own parameter copy θ_i (all equal to θ)
    and BatchNorm normalizes with the whole batch's statistics: every layer is applied sample
    by sample with θ + δ_i, BatchNorm normalizes the whole batch (F.batch_norm, training)
    then applies sample i's affine copy; autograd w.r.t. the δ_i. L = Σ_i ℓ_i."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    deltas = {n: torch.zeros((x.shape[0], *p.shape), dtype=p.dtype, requires_grad=True)
              for n, p in params.items()}
    names = {m: prefix for prefix, m in model.named_modules()}

    def own(module, i):
        prefix = names[module] + "."
        return {n[len(prefix):]: params[n] + deltas[n][i] for n in params
                if n.startswith(prefix) and "." not in n[len(prefix):]}

    def apply(module, h):
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            xhat = F.batch_norm(h, None, None, training=True, eps=module.eps)
            rows = []
            for i in range(h.shape[0]):
                p = own(module, i)
                shape = (-1,) + (1,) * (h.dim() - 2)
                rows.append(xhat[i] * p["weight"].view(shape) + p["bias"].view(shape))
            return torch.stack(rows)
        return torch.cat([torch.func.functional_call(module, own(module, i), (h[i:i + 1],))
                          for i in range(h.shape[0])])

    loss = sample_loss("cnn", model(x, apply=apply), target).sum()
    return dict(zip(deltas, torch.autograd.grad(loss, list(deltas.values()))))


def test_batchnorm_train_mode_is_each_samples_share_of_the_batch_gradient():
    model = make("cnn").train()
    x, t = batch("cnn", 5)
    U = flat(per_sample_copy_grads(model, x, t))
    cap = run_capture(model, "cnn", x, t, "sum", backend="reference")
    close(cap.gram(), U @ U.T, "BatchNorm train mode")
    close(U.sum(0), torch.cat([p.grad.flatten() for p in model.parameters()]),
          "the shares add up to the batch gradient")


# ---- float32: the default backends and Triton ------------------------------------------------

@pytest.mark.parametrize("name,backend", [(name, None) for name in MODELS] + [
    ("mlp", "triton"), ("transformer", "triton")])  # (Triton conv kernels: their own tests)
def test_float32_backends(name, backend):
    """float32 model, the default backends and Triton (the interpreter here): the errors of the
    Gram and of a weighted sum against the float64 oracle are at most a few times those of
    torch.func's own float32 per-sample gradients."""
    x, t = batch(name, 5)
    U64 = flat(oracle(name, 5))
    K64 = U64 @ U64.T
    model32 = make(name, torch.float32)
    x32 = x if name == "transformer" else x.float()
    U32 = flat(oracle(name, 5, dtype=torch.float32)).double()
    torch_error = float((U32 @ U32.T - K64).abs().max())
    cap = run_capture(model32, name, x32, t, backend=backend)
    K = cap.gram()
    assert K.dtype == torch.float32
    ours = float((K.double() - K64).abs().max())
    assert ours <= 4 * torch_error + 16 * 2.0 ** -24 * float(K64.abs().max()), (ours, torch_error)
    c = torch.randn(5, dtype=torch.float64)
    params = list(model32.parameters())
    got = torch.cat([cap.weighted_sum(c)[p].double().flatten() for p in params])
    want = U64.T @ c
    ws_torch = float((U32.T @ c - want).abs().max())
    assert float((got - want).abs().max()) <= (4 * ws_torch
                                                + 16 * 2.0 ** -24 * float(want.abs().max()))
