"""Capture: frozen parameters, the torch.func fallback and the error for unsupported layers,
parameters used outside their module, memory release, and bad arguments."""
import pytest
import torch
import torch.nn.functional as F
from test_capture_models import F64, batch, close, flat, make, per_sample_grads, run_capture
from torch import nn

from lowrank_kernels.capture import Capture


class Scale(nn.Module):
    """A module with parameters of its own and a child layer: y = inner(x) ⊙ w + b."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.b = nn.Parameter(torch.linspace(-0.2, 0.3, d))
        self.inner = nn.Linear(d, d)

    def forward(self, x):
        return self.inner(x) * self.w + self.b


class WithUnsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.bil = nn.Bilinear(6, 6, 5)
        self.scale = Scale(5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.bil(h, h.flip(-1)))
        return self.out(self.scale(h))


def _unsupported_model():
    torch.manual_seed(0)
    return WithUnsupported().to(F64)


def _inputs(B=5):
    g = torch.Generator().manual_seed(3)
    return torch.randn(B, 4, generator=g, dtype=F64), torch.randint(0, 3, (B,), generator=g)


def test_unsupported_layer_error_names_the_module():
    with pytest.raises(TypeError, match=r"module 'bil' \(Bilinear\) has trainable parameters"):
        Capture(_unsupported_model())
    model = _unsupported_model()
    model.bil.requires_grad_(False)
    Capture(model)  # Scale's own w, b are used directly (mul, add): followed natively


def test_torch_func_fallback_matches_per_sample_gradients():
    model = _unsupported_model()
    x, t = _inputs()
    grads = per_sample_grads(model, "mlp", x, t)
    U = flat(grads)
    cap = run_capture(model, "mlp", x, t, fallback=True, backend="reference")
    close(cap.gram(), U @ U.T, "fallback Gram")
    close(cap.gram(diagonal=True), (U * U).sum(1), "fallback diagonal")
    per_param = cap.gram(by="parameter")
    for name in ("bil.weight", "bil.bias", "scale.w", "scale.b", "scale.inner.weight"):
        G = grads[name].flatten(1)
        close(per_param[name], G @ G.T, f"fallback {name}")
    c = torch.randn(5, dtype=F64)
    sums = cap.weighted_sum(c)
    for name, p in model.named_parameters():
        close(sums[p], torch.einsum("b...,b->...", grads[name], c), f"fallback U c {name}")
    V = {p: torch.randn_like(p) for p in model.parameters()}
    close(cap.project(V), U @ torch.cat([V[p].flatten() for p in model.parameters()]),
          "fallback Uᵀ v")


@pytest.mark.parametrize("name", ["transformer", "cnn"])
def test_frozen_parameters_are_excluded(name):
    model = make(name)
    frozen = {"transformer": ["pos.weight", "ln1.weight", "ln1.bias", "q.weight", "up.bias"],
              "cnn": ["c1.weight", "bn1.weight", "shared.bias", "c3.bias"]}[name]
    params = dict(model.named_parameters())
    for n in frozen:
        params[n].requires_grad_(False)
    x, t = batch(name, 4)
    grads = per_sample_grads(model, name, x, t)
    assert not set(frozen) & set(grads)
    U = flat(grads)
    cap = run_capture(model, name, x, t, backend="reference")
    assert [n for n, _ in cap.parameters()] == list(grads)
    close(cap.gram(), U @ U.T, f"{name} with frozen parameters")
    assert set(cap.weighted_sum(torch.ones(4, dtype=F64))) == {params[n] for n in grads}


def test_parameter_used_outside_its_module_is_an_error():
    class Bypass(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return F.linear(x, self.lin.weight, self.lin.bias)  # lin's forward never runs

    model = Bypass().to(F64)
    x, t = _inputs()
    with Capture(model) as cap:
        F.cross_entropy(model(x), t).backward()
        with pytest.raises(RuntimeError, match=r"lin\.bias, lin\.weight received gradients"):
            cap.gram()


def test_captured_tensors_are_released_on_exit_and_hooks_removed():
    model = make("mlp")
    x, t = batch("mlp", 3)
    with Capture(model) as cap:
        F.cross_entropy(model(x), t).backward()
        K = cap.gram()
        assert cap._calls
    assert not cap._calls and not cap._hooks
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match=r"nothing captured"):
        cap.gram()
    kept = run_capture(model, "mlp", x, t)  # keep=True
    close(kept.gram(), K, "kept capture")
    kept.release()
    with pytest.raises(RuntimeError, match=r"nothing captured"):
        kept.gram()


def test_no_grad_forwards_are_not_recorded():
    model = make("mlp")
    x, t = batch("mlp", 3)
    U = flat(per_sample_grads(model, "mlp", x, t))
    with Capture(model) as cap:
        with torch.no_grad():
            model(batch("mlp", 4, seed=9)[0])  # another batch size: would be an error
        F.cross_entropy(model(x), t).backward()
        close(cap.gram(), U @ U.T, "after a no_grad forward")


# ---- bad arguments: each error names it -----------------------------------------------------

def test_bad_arguments_name_the_argument():
    model = make("mlp")
    with pytest.raises(TypeError, match=r"model must be an nn.Module"):
        Capture(lambda x: x)
    with pytest.raises(ValueError, match=r"loss_reduction must be 'mean', 'sum' or a positive"):
        Capture(model, loss_reduction="avg")
    with pytest.raises(ValueError, match=r"loss_reduction"):
        Capture(model, loss_reduction=-1.0)
    x, t = batch("mlp", 3)
    cap = run_capture(model, "mlp", x, t)
    with pytest.raises(ValueError, match=r"by must be 'model', 'module' or 'parameter'"):
        cap.gram(by="layer")
    with pytest.raises(TypeError, match=r"other must be a Capture"):
        cap.gram(torch.ones(3))
    other = run_capture(model, "mlp", *batch("mlp", 4, seed=5))
    with pytest.raises(ValueError, match=r"diagonal=True needs other's batch size 4"):
        cap.gram(other, diagonal=True)
    with pytest.raises(ValueError, match=r"c must have shape \(3,\) or \(3, m\)"):
        cap.weighted_sum(torch.ones(4, dtype=F64))
    with pytest.raises(TypeError, match=r"c must be a floating tensor"):
        cap.weighted_sum(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"write_grad=True needs c of shape \(B,\)"):
        cap.weighted_sum(torch.ones(3, 2, dtype=F64), write_grad=True)
    V = {p: torch.zeros_like(p) for p in model.parameters()}
    with pytest.raises(ValueError, match=r"V has no tensor for parameter 'norm.bias'"):
        cap.project({p: v for p, v in V.items() if p is not model.norm.bias})
    with pytest.raises(ValueError, match=r"V\[1\]\['inp.weight'\] must have shape \(7, 5\)"):
        cap.project([V, {**V, model.inp.weight: torch.zeros(5, 7, dtype=F64)}])
    with pytest.raises(ValueError, match=r"not captured"):
        cap.project({**V, nn.Parameter(torch.zeros(2)): torch.zeros(2)})
    with pytest.raises(TypeError, match=r"V must be a dict"):
        cap.project(torch.zeros(3))


def test_inconsistent_batches_and_unbatched_inputs():
    model = make("mlp")
    with Capture(model) as cap:
        (model(batch("mlp", 3)[0]).sum() + model(batch("mlp", 4)[0]).sum()).backward()
        with pytest.raises(ValueError, match=r"saw a batch of 4 samples, '.*' saw 3"):
            cap.gram()
    with Capture(model):
        with pytest.raises(ValueError, match=r"module 'inp' got an input of shape \(5,\)"):
            model(torch.randn(5, dtype=F64))


def test_embedding_scale_grad_by_freq_is_rejected():
    model = nn.Sequential(nn.Embedding(7, 3, scale_grad_by_freq=True))
    with pytest.raises(TypeError, match=r"module '0' \(nn.Embedding\) has scale_grad_by_freq"):
        Capture(model)


def test_sum_of_shares_is_the_batch_gradient_for_the_tied_transformer():
    """U 1 (sum reduction) equals what backward accumulated in .grad, tied weight included."""
    model = make("transformer")
    x, t = batch("transformer", 3)
    cap = run_capture(model, "transformer", x, t, "sum", backend="reference")
    total = cap.weighted_sum(torch.ones(3, dtype=F64))
    for name, p in model.named_parameters():
        close(total[p], p.grad, f"U 1 vs .grad of {name}")


def test_tied_embedding_cross_term_in_sample_blocks(monkeypatch):
    """The tied embedding/output-layer cross term computed one sample block at a time."""
    import lowrank_kernels.capture._kinds as kinds

    monkeypatch.setattr(kinds, "_PAIR_BLOCK", 1)
    model = make("transformer")
    x, t = batch("transformer", 3)
    grads = per_sample_grads(model, "transformer", x, t)
    G = grads["tok.weight"].flatten(1)
    cap = run_capture(model, "transformer", x, t, backend="reference")
    close(cap.gram(by="parameter")["tok.weight"], G @ G.T, "tied weight, blocks of 1 sample")


def test_layer_called_on_tokens_and_on_pooled_features():
    """One nn.Linear called on (B, 3, 4) tokens and on (B, 4) pooled features: the calls merge
    into one contribution over 3 + 1 tokens (its per-sample gradient is their sum)."""
    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.out(self.lin(torch.tanh(self.lin(x)).mean(1)))

    torch.manual_seed(0)
    model = Pooled().to(F64)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(5, 3, 4, generator=g, dtype=F64), torch.randint(0, 3, (5,), generator=g)
    grads = per_sample_grads(model, "mlp", x, t)
    U = flat(grads)
    cap = run_capture(model, "mlp", x, t, backend="reference")
    assert len(cap._contributions()[id(model.lin.weight)]) == 1
    close(cap.gram(), U @ U.T, "shared layer on tokens and pooled features")
    c = torch.randn(5, dtype=F64)
    close(cap.weighted_sum(c)[model.lin.weight],
          torch.einsum("b...,b->...", grads["lin.weight"], c), "U c of the shared weight")
