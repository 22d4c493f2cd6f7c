"""Issue 12's silent-wrong-Gram cases are errors now (or right): two backward passes into one
Capture (double backward, micro-batches), a parameter used by its module and directly, and
a first captured parameter that got no gradient."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowrank_kernels import Capture

F64 = torch.float64


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)


def _data(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, generator=g, dtype=F64), torch.randint(0, 3, (B,), generator=g)


def test_double_backward_raises():
    model = _mlp()
    x, t = _data(5)
    with Capture(model) as cap:
        loss = F.cross_entropy(model(x), t)
        loss.backward(retain_graph=True)
        loss.backward()
        with pytest.raises(RuntimeError, match="more than one backward pass"):
            cap.gram()


def test_two_micro_batches_raise():
    model = _mlp()
    with Capture(model) as cap:
        for seed in (1, 2):
            x, t = _data(5, seed)
            F.cross_entropy(model(x), t).backward()
        with pytest.raises(RuntimeError, match="micro-batches"):
            cap.gram()
        cap.release()  # the next batch is fine
        x, t = _data(5, 3)
        F.cross_entropy(model(x), t).backward()
        assert cap.gram().shape == (5, 5)


class TiedHead(nn.Module):
    """emb(idx) and a head written x @ emb.weight.T: the weight is used outside its module."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)

    def forward(self, idx):
        return torch.tanh(self.emb(idx)).mean(1) @ self.emb.weight.T


def test_parameter_used_by_its_module_and_directly_raises():
    torch.manual_seed(0)
    model = TiedHead().to(F64)
    idx = torch.randint(0, 7, (5, 3))
    with Capture(model) as cap:
        F.cross_entropy(model(idx), idx[:, 0]).backward()
        with pytest.raises(RuntimeError, match="do not add up to its gradient"):
            cap.gram()
    with Capture(model, check=False) as cap:  # the check can be turned off
        F.cross_entropy(model(idx), idx[:, 0]).backward()
        cap.gram()


def test_first_parameter_without_gradient():
    model = _mlp()
    x, t = _data(5)
    with Capture(model) as cap:
        with torch.no_grad():
            h = model[0](x)
        F.cross_entropy(model[2](torch.tanh(h)), t).backward()
        K = cap.gram()
        assert K.shape == (5, 5) and torch.isfinite(K).all()
        assert cap.gram(diagonal=True).shape == (5,)
        assert set(cap.gram(by="parameter")) == {n for n, _ in model.named_parameters()}


class Positional(nn.Module):
    """A token table and a position table called on (1, T) positions, broadcast over B."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos, self.out = nn.Embedding(9, 4), nn.Embedding(6, 4), nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, idx):
        positions = torch.arange(idx.shape[1])[None]
        h = (self.tok(idx) + self.pos(positions)) * self.scale
        return self.out(torch.tanh(h).mean(1))


def test_broadcast_position_table_and_direct_scale_are_exact():
    torch.manual_seed(0)
    model = Positional().to(F64)
    idx = torch.randint(0, 9, (5, 4))
    t = torch.randint(0, 3, (5,))
    params = dict(model.named_parameters())

    def loss(values, i):
        logits = torch.func.functional_call(model, values, (idx[i:i + 1],))
        return F.cross_entropy(logits, t[i:i + 1])

    rows = [torch.func.grad(loss)({n: p.detach() for n, p in params.items()}, i)
            for i in range(5)]
    U = torch.stack([torch.cat([r[n].flatten() for n in params]) for r in rows])
    with Capture(model, backend="reference") as cap:
        F.cross_entropy(model(idx), t).backward()
        K = cap.gram()
    torch.testing.assert_close(K, U @ U.T, rtol=1e-10, atol=1e-12)


def test_autocast_bf16_gives_fp32_results():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    x = torch.randn(5, 4)
    t = torch.randint(0, 3, (5,))
    with Capture(model) as cap:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), t)
        loss.backward()
        K = cap.gram()
        sums = cap.weighted_sum(torch.ones(5))
    assert K.dtype == torch.float32 and torch.isfinite(K).all()
    assert all(v.dtype == torch.float32 for v in sums.values())
