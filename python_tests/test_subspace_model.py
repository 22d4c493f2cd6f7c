"""Random-subspace training: SubspaceModel's gradient is Pᵀ ∇θ (float64, torch.func, P made
explicit column by column), the Fastfood P is its formula, and a ResNet-18-sized model trains
in d = 10,000 directions without any D×d tensor."""
import math
import resource

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lowrank_kernels.subspace as sub

KINDS = ["dense", "sparse", "fastfood", "onthefly"]


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(),
                               torch.nn.Linear(6, 3)).double()


def _explicit_P(projection, D, d):
    zero = torch.zeros(D, dtype=torch.float64)
    return torch.stack([projection(e, zero) for e in torch.eye(d, dtype=torch.float64)], 1)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_is_projected_full_gradient(kind):
    model = _mlp()
    wrapped = sub.SubspaceModel(model, 7, kind, seed=3)
    with torch.no_grad():
        wrapped.coords.normal_()
    x = torch.randn(4, 5, dtype=torch.float64)
    loss = torch.tanh(wrapped(x)).square().sum()
    loss.backward()
    P = _explicit_P(wrapped.projection, wrapped.D, 7)
    theta = wrapped.theta0 + P @ wrapped.coords.detach()

    def full_loss(t):
        return torch.tanh(torch.func.functional_call(model, wrapped.parameters_from(t),
                                                     (x,))).square().sum()

    grad_theta = torch.func.grad(full_loss)(theta)
    torch.testing.assert_close(loss, full_loss(theta), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(wrapped.coords.grad, P.T @ grad_theta, rtol=1e-12, atol=1e-13)
    assert [n for n, p in wrapped.named_parameters() if p.requires_grad] == ["coords"]


def test_fastfood_is_its_formula():
    """P = [V₁; …; V_m]/√m truncated, V_j = H G_j Π_j H B_j / (‖G_j‖√n), dense H in float64."""
    D, d = 45, 5
    proj = sub.FastfoodProjection(D, d, seed=1, dtype=torch.float64)
    n, m = proj.n, proj.signs.shape[0]
    assert (n, m) == (8, 6)
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), H)
    blocks = []
    for j in range(m):
        Pi = torch.eye(n, dtype=torch.float64)[proj.perm[j]]  # (Π x)_i = x_{perm_i}
        G = proj.gauss[j]
        V = H @ torch.diag(G) @ Pi @ H @ torch.diag(proj.signs[j])
        blocks.append(V / (G.norm() * math.sqrt(n * m)))
    expected = torch.cat(blocks)[:D, :d]
    torch.testing.assert_close(_explicit_P(proj, D, d), expected, rtol=1e-13, atol=1e-14)
    full = torch.cat(blocks)[:, :d]
    torch.testing.assert_close(full.norm(dim=0), torch.ones(d, dtype=torch.float64))


def test_sparse_projection_density_and_columns():
    D, d = 400, 9
    proj = sub.SparseProjection(D, d, seed=2, dtype=torch.float64)
    P = proj.P.to_dense()
    nonzeros = (P != 0).sum(0)  # ρ = 1/√D: 20 draws per column, a few rows drawn twice
    assert bool(((nonzeros <= 20) & (nonzeros >= 15)).all()), nonzeros
    torch.testing.assert_close(P.norm(dim=0), torch.ones(d, dtype=torch.float64))


def test_onthefly_projection_is_the_sketch_matrix():
    import lowrank_kernels as lk

    D, d = 57, 6
    proj = sub.OnTheFlyProjection(D, d, seed=4)
    P = torch.stack([proj(e, torch.zeros(D)) for e in torch.eye(d)], 1).double()
    Om = lk.sketch_omega(torch.arange(D), d, 4, backend="reference").double()
    torch.testing.assert_close(P, Om / math.sqrt(D), rtol=1e-6, atol=1e-7)


# ---- a ResNet-18-sized model (11M parameters) in d = 10,000 directions ------------------

class _Block(torch.nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout)
        self.short = torch.nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False),
                                             torch.nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


def resnet18(classes=10):
    layers = [torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(64),
              torch.nn.ReLU()]
    cin = 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
        cin = cout
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(512, classes)]
    return torch.nn.Sequential(*layers)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


def _train_step(model, x, y):
    opt = torch.optim.SGD([model.coords], lr=0.1)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


D_INT = 10_000


def test_resnet18_fastfood_trains_without_P():
    torch.manual_seed(0)
    net = resnet18()
    D = sum(p.numel() for p in net.parameters())
    assert D > 11_000_000  # a dense P would hold D·d > 1.1·10¹¹ entries (440 GB in fp32)
    wrapped = sub.SubspaceModel(net, D_INT, "fastfood", seed=0)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    with _LargestTensor() as record:
        loss = _train_step(wrapped, x, y)
    assert torch.isfinite(loss) and wrapped.coords.abs().sum() > 0
    n = wrapped.projection.n
    # The largest tensors are the m × n Fastfood blocks (≤ D + n) — never D × d.
    assert record.largest <= D + n, (record.largest, record.op)
    buffers = sum(b.numel() for b in wrapped.projection.buffers())
    assert buffers <= 3 * (D + n) + D_INT  # B, Π, G (and per-block scales): O(D)
    # Peak resident memory: model, θ₀, gradients and O(D) Fastfood state, far below P.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 < 6e9


def test_resnet18_onthefly_never_allocates_P():
    """By construction: the same step traced with fake tensors (shapes only; the on-the-fly
    ops' fake kernels give D- and d-vectors) — no tensor of D×d is ever produced."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        torch.manual_seed(0)
        net = resnet18()
        D = sum(p.numel() for p in net.parameters())
        wrapped = sub.SubspaceModel(net, D_INT, "onthefly", seed=0)
        x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
        with _LargestTensor() as record:
            _train_step(wrapped, x, y)
        assert wrapped.coords.grad.shape == (D_INT,)
    assert record.largest == D, (record.largest, record.op)


@pytest.fixture(scope="module")
def sweep():
    """A small intrinsic-dimension sweep (an MLP on a separable toy problem)."""
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()

    def build():
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))

    def train_and_evaluate(model, params):
        opt = torch.optim.Adam(params, lr=0.1)
        for _ in range(60):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        with torch.no_grad():
            return float((model(x).argmax(1) == y).float().mean())

    return sub.intrinsic_dimension(build, train_and_evaluate, [1, 2, 4, 16], "dense")


def test_intrinsic_dimension_sweep(sweep, tmp_path):
    result = sweep
    assert result.num_parameters == 58 and len(result.accuracies) == 4
    expected = next((d for d, a in zip(result.dims, result.accuracies)
                     if a >= 0.9 * result.full_accuracy), None)
    assert result.d_int == expected and result.full_accuracy > 0.9
    result.to_json(tmp_path / "id.json")
    assert (tmp_path / "id.json").stat().st_size > 0


def test_intrinsic_dimension_plot(sweep, tmp_path):
    pytest.importorskip("matplotlib")  # installed by the test command; absent on bare images
    sweep.plot(tmp_path / "id.png")
    assert (tmp_path / "id.png").stat().st_size > 1000


def test_bad_input():
    with pytest.raises(ValueError, match=r"projection must be one of"):
        sub.SubspaceModel(_mlp(), 3, "hashed")
    with pytest.raises(ValueError, match=r"d must be ≥ 1"):
        sub.SubspaceModel(_mlp(), 0)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        sub.SparseProjection(10, 2, density=2.0)
