"""ng_solve: (F + λI)⁻¹ v in sample space against a dense float64 solve with explicit
per-sample gradients (torch.func), for the whole model and block-diagonal per module."""
import pytest
import torch
from torch import nn

import lowrank_kernels as lk


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(3 * 3 * 3, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 4)).double()


def _batch(B):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, 2, 5, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (B,), generator=g))


def _per_sample_gradients(model, x, y):
    """U (B × D) in named_parameters order, and the D-slices of each module's block."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi[None],))
        return nn.functional.cross_entropy(out, yi[None])

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    U = torch.cat([g.flatten(1) for g in grads.values()], dim=1)
    blocks, start = {}, 0
    for name, p in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        blocks.setdefault(module, []).append(slice(start, start + p.numel()))
        start += p.numel()
    return U, blocks


def _dense_solve(U, lam, v):
    B, D = U.shape
    F = U.T @ U / B
    return torch.linalg.solve(F + lam * torch.eye(D, dtype=U.dtype), v)


def _flat(direction, model):
    return torch.cat([direction[p].flatten() for p in model.parameters()])


def _captured(model, x, y):
    cap = lk.Capture(model, loss_reduction="mean", keep=True)
    with cap:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
    return cap


@pytest.mark.parametrize("B", [1, 7])
@pytest.mark.parametrize("by", ["model", "module"])
@pytest.mark.parametrize("general_v", [False, True], ids=["mean_grad", "general_v"])
def test_matches_dense_float64_solve(B, by, general_v):
    model = _model()
    x, y = _batch(B)
    U, blocks = _per_sample_gradients(model, x, y)
    cap = _captured(model, x, y)
    lam = 0.3
    g = torch.Generator().manual_seed(2)
    if general_v:
        v = {p: torch.randn(p.shape, generator=g, dtype=torch.float64)
             for p in model.parameters()}
        v_flat = _flat(v, model)
    else:
        v, v_flat = None, U.mean(0)
    result = lk.ng_solve(cap, lam, v, by=by, backend="reference")
    got = _flat(result.direction, model)
    if by == "model":
        want = _dense_solve(U, lam, v_flat)
    else:  # block-diagonal F: one dense solve per module's slice of the parameters
        want = torch.empty_like(v_flat)
        for slices in blocks.values():
            idx = torch.cat([torch.arange(s.start, s.stop) for s in slices])
            want[idx] = _dense_solve(U[:, idx], lam, v_flat[idx])
        assert set(result.info) == set(blocks)
    assert all(code == 0 for code in result.info.values())
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))
    cap.release()


def test_writes_grad_and_default_backends():
    model = _model()
    x, y = _batch(5)
    U, _ = _per_sample_gradients(model, x, y)
    cap = _captured(model, x, y)
    lk.ng_solve(cap, 0.1, by="module", write_grad=True)  # default backends (native on CPU)
    reference = lk.ng_solve(cap, 0.1, by="module", backend="reference").direction
    for p in model.parameters():
        torch.testing.assert_close(p.grad, reference[p], rtol=1e-10, atol=1e-13)
    cap.release()


def test_bad_arguments():
    model = _model()
    x, y = _batch(3)
    cap = _captured(model, x, y)
    with pytest.raises(ValueError, match="damping must be a finite number > 0"):
        lk.ng_solve(cap, 0.0)
    with pytest.raises(TypeError, match="capture must be"):
        lk.ng_solve(model, 0.1)
    with pytest.raises(ValueError, match="by must be"):
        lk.ng_solve(cap, 0.1, by="layer")
    first = next(model.parameters())
    with pytest.raises(ValueError, match="has no tensor for parameter"):
        lk.ng_solve(cap, 0.1, {first: torch.zeros_like(first)})
    cap.release()
