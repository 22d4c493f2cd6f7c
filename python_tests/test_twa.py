"""TWA: α-steps on w = P α equal SGD when span(P) holds the gradients, projected SGD
otherwise; subspace building, checkpoint collection, BatchNorm recomputation."""
import pytest
import torch
from numerics import gamma

import lowrank_kernels.subspace as sub
from lowrank_kernels.optim import TWA


def _mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(),
                               torch.nn.Linear(6, 3)).to(dtype)


def _batch(dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(11, 5, generator=g, dtype=dtype),
            torch.randint(0, 3, (11,), generator=g))


def _train(model, opt, steps=4):
    x, y = _batch(next(model.parameters()).dtype)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return sub.flatten_parameters(model.parameters())


@pytest.mark.parametrize("basis", ["identity", "orthogonal"])
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_full_rank_basis_reproduces_sgd(basis, momentum, nesterov):
    model_sgd, model_twa = _mlp(), _mlp()
    D = sum(p.numel() for p in model_twa.parameters())
    if basis == "identity":
        P = torch.eye(D, dtype=torch.float64)
    else:
        P = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64))[0]
    kw = dict(lr=0.3, momentum=momentum, weight_decay=1e-2, nesterov=nesterov)
    w_sgd = _train(model_sgd, torch.optim.SGD(model_sgd.parameters(), **kw))
    w_twa = _train(model_twa, TWA(model_twa.parameters(), P, init="current", **kw))
    tol = 0.0 if basis == "identity" else 1e-12  # P = I: every product is exact
    torch.testing.assert_close(w_twa, w_sgd, rtol=tol, atol=tol)


def _checkpoints(model, k=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    w = sub.flatten_parameters(model.parameters())
    return [w + 0.1 * torch.randn(w.shape, generator=g, dtype=w.dtype) for _ in range(k)]


def test_low_rank_subspace_is_projected_sgd():
    """w_{t+1} = w_t − η P Pᵀ g_t from the checkpoints' average, against a dense float64
    QR of the checkpoints."""
    model, reference = _mlp(), _mlp()
    ckpts = _checkpoints(model)
    space = sub.build_subspace(ckpts, dtype=torch.float64)
    opt = TWA(model.parameters(), space, lr=0.5)
    C = torch.stack(ckpts, 1)
    torch.testing.assert_close(sub.flatten_parameters(model.parameters()), C.mean(1),
                               rtol=1e-13, atol=1e-13)
    Q = torch.linalg.qr(C)[0]
    w = C.mean(1)
    x, y = _batch()
    for _ in range(3):
        torch.nn.utils.vector_to_parameters(w, reference.parameters())
        reference.zero_grad()
        torch.nn.functional.cross_entropy(reference(x), y).backward()
        g = sub.flatten_parameters(p.grad for p in reference.parameters())
        w = w - 0.5 * Q @ (Q.T @ g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        torch.testing.assert_close(sub.flatten_parameters(model.parameters()), w,
                                   rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(space.P @ opt.alpha, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_float32_blocked_and_offload_path(backend):
    """fp32 P streamed in blocks of 7 rows (the offload path) through each backend, against
    the float64 step from the same (α, b, g): |Δc| ≤ γ_{D+1} |P|ᵀ|g|, then a few fp32
    roundings of the update, and |Δw| ≤ γ_{k+1} |P||α|."""
    model = _mlp(torch.float32)
    space = sub.build_subspace(_checkpoints(model, k=4), dtype=torch.float32, device="cpu",
                               pin_memory=True)
    lr, mu, u = 0.1, 0.5, 2.0 ** -24
    opt = TWA(model.parameters(), space, lr=lr, momentum=mu, chunk_rows=7, backend=backend)
    P64 = space.P.double()
    D = P64.shape[0]
    x, y = _batch(torch.float32)
    for step in range(3):
        alpha = opt.alpha.double().clone()
        buf = opt.state[opt.params[0]].get("momentum_buffer")
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        g = sub.flatten_parameters(p.grad for p in model.parameters()).double()
        c = P64.T @ g
        new_buf = c if buf is None else mu * buf.double() + c
        new_alpha = alpha - lr * new_buf
        opt.step()
        bound = (lr * (1 + mu) * gamma(D + 1) * (P64.abs().T @ g.abs())
                 + 4 * u * (alpha.abs() + lr * new_buf.abs()))
        assert bool(((opt.alpha.double() - new_alpha).abs() <= bound).all()), step
        a = opt.alpha.double()
        w = sub.flatten_parameters(model.parameters()).double()
        assert bool(((w - P64 @ a).abs() <= gamma(space.k + 1) * (P64.abs() @ a.abs())).all())


def test_state_dict_checkpoints_and_collector():
    model = _mlp()
    collector = sub.CheckpointCollector(model, every=2, max_checkpoints=2,
                                        dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch()
    states = []
    for _ in range(6):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        collector.step()
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert len(collector.checkpoints) == 2  # steps 2, 4, 6 collected; the oldest dropped
    torch.testing.assert_close(collector.checkpoints[1],
                               sub.flatten_parameters(model.parameters()))
    a = sub.build_subspace(collector.checkpoints, dtype=torch.float64)
    b = sub.build_subspace([states[3], states[5]], model=model, dtype=torch.float64)
    torch.testing.assert_close(a.P @ a.mean_alpha, b.P @ b.mean_alpha, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(a.P.T @ a.P, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-14)


def test_recompute_batchnorm_is_the_dataset_average():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    data = torch.randn(40, 4)
    loader = [(data[i:i + 10], torch.zeros(10)) for i in range(0, 40, 10)]
    model.eval()
    sub.recompute_batchnorm(model, loader)
    assert not model.training and model[1].momentum == 0.1
    with torch.no_grad():
        h = model[0](data)
    torch.testing.assert_close(model[1].running_mean, h.mean(0), rtol=1e-5, atol=1e-6)
    # running_var: cumulative average of the per-batch unbiased variances
    per_batch = torch.stack([h[i:i + 10].var(0, unbiased=True) for i in range(0, 40, 10)])
    torch.testing.assert_close(model[1].running_var, per_batch.mean(0), rtol=1e-5, atol=1e-6)


def test_bad_input():
    model = _mlp()
    D = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match=r"subspace was built for D = 5"):
        TWA(model.parameters(), torch.eye(5, dtype=torch.float64), lr=0.1, init="current")
    with pytest.raises(ValueError, match=r"lr must be positive"):
        TWA(model.parameters(), torch.eye(D), lr=0.0)
    with pytest.raises(ValueError, match=r"init='mean' needs a Subspace"):
        TWA(model.parameters(), torch.eye(D, dtype=torch.float64), lr=0.1)
    with pytest.raises(ValueError, match=r"checkpoints\[1\] has 3 parameters"):
        sub.build_subspace([torch.zeros(4), torch.zeros(3)])
    with pytest.raises(ValueError, match=r"need `model`"):
        sub.build_subspace([model.state_dict()])


def test_schedule_regular_training_then_twa_phase():
    """The paper's schedule on a small BatchNorm network: SGD while a CheckpointCollector
    samples the weights, then TWA from the checkpoints' average in their span, then the
    BatchNorm statistics recomputed. The TWA phase must lower the training loss well below
    that of the plain average, and the weights must stay in the span."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.BatchNorm1d(16),
                                torch.nn.ReLU(), torch.nn.Linear(16, 3))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(96, 5, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)]
    collector = sub.CheckpointCollector(model, every=3)
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(6):
        for xb, yb in batches:
            sgd.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            sgd.step()
            collector.step()
    assert len(collector.checkpoints) == 6
    space = sub.build_subspace(collector.checkpoints)

    def train_loss():
        model.eval()
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        model.train()
        return float(loss)

    twa = TWA(model.parameters(), space, lr=0.5, momentum=0.9)
    sub.recompute_batchnorm(model, batches)
    loss_average = train_loss()
    for epoch in range(5):
        for xb, yb in batches:
            twa.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            twa.step()
    sub.recompute_batchnorm(model, batches)
    assert train_loss() < 0.75 * loss_average  # 0.71 → 0.31 here
    w = sub.flatten_parameters(model.parameters())
    residual = w - space.P @ (space.P.T @ w)
    assert float(residual.norm()) <= 1e-5 * float(w.norm())
