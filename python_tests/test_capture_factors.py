"""The public per-parameter Factors of a Capture (cap.factors()) on real models (an MLP with a
shared layer, a CNN with strided / padded / dilated / grouped / 'same' / circular / shared
convolutions and norms, a tiny transformer with tied embeddings) against per-sample gradients
from torch.func (vmap(grad)) in float64: Gram and its diagonal, cross-Grams of two batches,
weighted sums, projections, the layer tokens, the Kronecker sketch, the state_dict round trip,
lifetime after release, immutability and argument errors."""
import io
import math

import pytest
import torch
from test_capture_models import F64, batch, close, make, per_sample_grads, run_capture

import lowrank_kernels as lk
from lowrank_kernels.capture import Capture, Factors, LayerTokens
from lowrank_kernels.sketch.per_sample import output_side_seed

MODELS = ["mlp", "cnn", "transformer"]


def captured(name, B, seed=1, dtype=F64):
    """(model, {parameter name: Factors}, {parameter name: per-sample gradients (B, *shape)})."""
    model = make(name, dtype)
    x, t = batch(name, B, dtype, seed)
    grads = per_sample_grads(model, name, x, t) if dtype == F64 else None
    cap = run_capture(model, name, x, t, backend="reference")
    names = {id(p): n for n, p in model.named_parameters()}
    factors = {names[id(p)]: f for p, f in cap.factors().items()}
    return model, factors, grads, cap


@pytest.mark.parametrize("name", MODELS)
def test_gram_weighted_sum_project_per_parameter(name):
    B, m = 5, 2
    model, factors, grads, cap = captured(name, B)
    assert list(factors) == [n for n, _ in model.named_parameters()]  # all used, model order
    g = torch.Generator().manual_seed(7)
    for pname, f in factors.items():
        G = grads[pname]
        U = G.flatten(1)
        assert isinstance(f, Factors)
        assert (f.batch_size, f.shape, f.dtype) == (B, tuple(G.shape[1:]), F64)
        close(f.gram(), U @ U.T, f"{name} {pname} K")
        close(f.gram(diagonal=True), (U * U).sum(1), f"{name} {pname} diag K")
        c = torch.randn(B, m, generator=g, dtype=F64)
        close(f.weighted_sum(c[:, 0]), torch.einsum("b...,b->...", G, c[:, 0]),
              f"{name} {pname} U c")
        close(f.weighted_sum(c), torch.einsum("b...,bm->m...", G, c), f"{name} {pname} U C")
        V = torch.randn(m, *G.shape[1:], generator=g, dtype=F64)
        close(f.project(V[0]), U @ V[0].flatten(), f"{name} {pname} Uᵀ v")
        close(f.project(V), U @ V.flatten(1).T, f"{name} {pname} Uᵀ V")


@pytest.mark.parametrize("name", MODELS)
def test_cross_gram_of_two_batches(name):
    """gram(other) = U₁ᵀ U₂ for a second batch (another size); diagonal for an equal size."""
    _, first, G1, _ = captured(name, 5, seed=1)
    _, second, G2, _ = captured(name, 3, seed=2)
    _, third, G3, _ = captured(name, 5, seed=3)
    for pname, f in first.items():
        U1, U2, U3 = (G[pname].flatten(1) for G in (G1, G2, G3))
        close(f.gram(second[pname]), U1 @ U2.T, f"{name} {pname} cross K")
        close(f.gram(third[pname], diagonal=True), (U1 * U3).sum(1),
              f"{name} {pname} diag of cross K")


def _from_tokens(tokens, shape):
    a, e = tokens
    return torch.einsum("bno,bni->boi", e, a).reshape(a.shape[0], *shape)


@pytest.mark.parametrize("name, expected", [
    ("mlp", {"inp.weight", "shared.weight", "out.weight"}),
    ("cnn", {"c1.weight", "c3.weight", "c4.weight", "fc.weight"}),  # not grouped c2, not the
    ("transformer", {"q.weight", "k.weight", "v.weight", "o.weight", "up.weight",  # shared
                     "down.weight"}),                                              # 1×1 conv
])
def test_layer_tokens(name, expected):
    """tokens(): g_i = Σ_t e_it a_itᵀ for Linear weights (a shared layer: both calls' tokens)
    and single-call Conv2d weights (groups = 1, any padding); None for everything else (biases,
    norms, embeddings, the tied embedding/output weight, grouped or shared convolutions)."""
    B = 3
    _, factors, grads, _ = captured(name, B)
    have = {pname for pname, f in factors.items() if f.tokens() is not None}
    assert have == expected
    for pname in expected:
        tokens = factors[pname].tokens()
        assert isinstance(tokens, LayerTokens)
        a, e = tokens.inputs, tokens.output_grads
        d_out, d_in = grads[pname].shape[1], math.prod(grads[pname].shape[2:])
        assert a.shape[0] == e.shape[0] == B and a.shape[1] == e.shape[1]
        assert (a.shape[2], e.shape[2]) == (d_in, d_out)
        close(_from_tokens(tokens, grads[pname].shape[1:]), grads[pname], f"{name} {pname}")
    if name == "mlp":
        assert factors["shared.weight"].tokens().inputs.shape[1] == 2  # both calls' tokens


def _omega(n, k, seed):
    """S ᵀ = Ω/√k (n × k), Rademacher, from sketch_omega's (seed, row, column) counter."""
    return lk.sketch_omega(torch.arange(n), k, seed, "rademacher",
                           backend="reference").double() / math.sqrt(k)


@pytest.mark.parametrize("name, pname, size", [
    ("mlp", "inp.weight", 3),      # Linear 7 × 5: both sides sketched
    ("mlp", "shared.weight", 9),   # two merged calls; s = min(9, 7) = 7 per side
    ("cnn", "c1.weight", 2),       # Conv2d 4 × 3 × 3 × 3: channels mixed
    ("cnn", "shared.weight", 3),   # a 1×1 conv called twice: the sketch of the sum
    ("transformer", "up.weight", 4),
])
def test_sketch_is_the_two_sided_sketch_of_the_per_sample_gradients(name, pname, size):
    """sketch(s, seed): the Factors of g̃_i = S_out g_i S_inᵀ (S_in from seed, S_out from
    output_side_seed(seed), the same for every call of the parameter); Gram, weighted sum and
    projection of the sketched factors against the same sketch of torch.func's g_i."""
    B, seed = 4, 11
    _, factors, grads, _ = captured(name, B)
    G = grads[pname]  # (B, d_out, d_in[, kh, kw])
    k_out, k_in = min(size, G.shape[1]), min(size, G.shape[2])
    sketched = factors[pname].sketch(size, seed)
    Gs = torch.einsum("oa,boi...,ic->bac...", _omega(G.shape[1], k_out, output_side_seed(seed)),
                      G, _omega(G.shape[2], k_in, seed))
    assert sketched.shape == tuple(Gs.shape[1:]) and sketched.batch_size == B
    U = Gs.flatten(1)
    close(sketched.gram(), U @ U.T, f"{name} {pname} sketched K")
    c = torch.linspace(-1, 1, B, dtype=F64)
    close(sketched.weighted_sum(c), torch.einsum("b...,b->...", Gs, c), "sketched U c")
    V = torch.linspace(-1, 1, U.shape[1], dtype=F64).reshape(Gs.shape[1:])
    close(sketched.project(V), U @ V.flatten(), "sketched Uᵀ v")


def test_sketch_leaves_other_parameters_exact():
    _, cnn, _, _ = captured("cnn", 2)
    _, transformer, _, _ = captured("transformer", 2)
    for f in (cnn["c2.weight"], cnn["c1.bias"], cnn["bn1.weight"], transformer["tok.weight"],
              transformer["pos.weight"]):
        assert f.sketch(2, 0) is f


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_state_dict_round_trip(name):
    """state_dict() saves with torch.save and loads with weights_only=True; the loaded Factors
    give bit-identical results."""
    B = 3
    _, factors, _, _ = captured(name, B)
    buffer = io.BytesIO()
    torch.save({n: f.state_dict() for n, f in factors.items()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    c = torch.linspace(-1, 2, B, dtype=F64)
    for pname, f in factors.items():
        g = Factors.from_state_dict(loaded[pname], backend="reference")
        assert (g.batch_size, g.shape, g.dtype) == (f.batch_size, f.shape, f.dtype)
        V = torch.ones(f.shape, dtype=F64)
        assert torch.equal(g.gram(), f.gram()), pname
        assert torch.equal(g.weighted_sum(c), f.weighted_sum(c)), pname
        assert torch.equal(g.project(V), f.project(V)), pname


def test_factors_outlive_release_and_the_next_batch():
    """The same objects until the next batch; after release() and a new batch captured by the
    same Capture, the old Factors still describe the old batch."""
    model = make("mlp")
    x1, t1 = batch("mlp", 4, seed=1)
    x2, t2 = batch("mlp", 3, seed=2)
    G1 = per_sample_grads(model, "mlp", x1, t1)
    cap = run_capture(model, "mlp", x1, t1, backend="reference")
    old = cap.factors()
    assert all(f is cap.factors()[p] for p, f in old.items())
    cap.release()
    with pytest.raises(RuntimeError, match="nothing captured"):
        cap.factors()
    with cap:
        torch.nn.functional.cross_entropy(model(x2), t2).backward()
    new = cap.factors()
    for n, p in model.named_parameters():
        assert new[p] is not old[p] and new[p].batch_size == 3
        U = G1[n].flatten(1)
        close(old[p].gram(), U @ U.T, f"kept {n}")


def test_float32_factors_match_the_capture():
    """A float32 model: float32 results, equal to the capture's own per-parameter Gram."""
    model, factors, _, cap = captured("cnn", 3, dtype=torch.float32)
    per_param = cap.gram(by="parameter")
    for pname, f in factors.items():
        assert f.dtype == torch.float32
        assert torch.equal(f.gram(), per_param[pname]), pname


def test_immutable_and_argument_errors():
    _, factors, _, _ = captured("mlp", 3)
    f = factors["inp.weight"]
    with pytest.raises(AttributeError, match="immutable"):
        f.shape = (1,)
    with pytest.raises(TypeError, match="Capture.factors"):
        Factors([])
    with pytest.raises(ValueError, match=r"c must have shape \(3,\)"):
        f.weighted_sum(torch.ones(4, dtype=F64))
    with pytest.raises(TypeError, match="c must be a floating tensor"):
        f.weighted_sum(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"V must have shape \(7, 5\)"):
        f.project(torch.ones(5, 7, dtype=F64))
    with pytest.raises(TypeError, match="other must be Factors"):
        f.gram(torch.ones(3, 3))
    with pytest.raises(ValueError, match="other has parameter shape"):
        f.gram(factors["out.weight"])
    with pytest.raises(ValueError, match="size must be an int >= 1"):
        f.sketch(0, 1)
    with pytest.raises(ValueError, match="non-empty list"):
        Factors.from_state_dict([])
    with pytest.raises(ValueError, match="unknown entry kind 'sparse'"):
        Factors.from_state_dict([{"kind": "sparse"}])
    _, other, _, _ = captured("mlp", 2, seed=2)
    with pytest.raises(ValueError, match="diagonal=True needs other's batch size 2"):
        f.gram(other["inp.weight"], diagonal=True)


def test_unused_parameter_has_no_factors():
    """A parameter whose module is not called in the batch has no entry."""
    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.used, self.unused = (torch.nn.Linear(3, 3), torch.nn.Linear(3, 2),
                                                 torch.nn.Linear(3, 2))

        def forward(self, x):
            return self.used(torch.tanh(self.body(x)))

    model = TwoHeads().to(F64)
    with Capture(model, keep=True) as cap:
        model(torch.randn(4, 3, dtype=F64)).sum().backward()
    keys = cap.factors().keys()
    assert {id(p) for p in keys} == {id(p) for m in (model.body, model.used)
                                     for p in m.parameters()}
