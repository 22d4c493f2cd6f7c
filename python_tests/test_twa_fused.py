"""TWA's fused CPU step (lowrank_kernels_twa::twa_step, csrc/subspace_project.cpp): the same
step as TWA.step's op-by-op path — against a float64 evaluation of the formulas, for
column- and row-major P, several parameters (a frozen one, one without a gradient), momentum,
Nesterov and weight decay — and the same skip rule (nothing written, counted)."""
import pytest
import torch

import lowrank_kernels.subspace as sub
from lowrank_kernels.optim import TWA

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(3, 5), (7,), (20011,), (4, 4)]  # D = 20057: several row chunks and blocks


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    ps[3].requires_grad_(False)  # frozen: never moves, its gradient is left out
    return ps


def _basis(D, k, layout, seed=1):
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(D, k, generator=g, dtype=torch.float64))[0]
    return (Q.float() if layout == "columns" else Q.float().contiguous()), Q


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        p.grad = None if i == 1 else torch.randn(p.shape, generator=g)  # params[1]: no grad


@pytest.mark.parametrize("layout", ["columns", "rows"])
@pytest.mark.parametrize("momentum,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 1e-2),
                                                  (0.9, True, 1e-3)])
def test_fused_step_is_the_formulas(layout, momentum, nesterov, wd):
    params = _params()
    D = sum(p.numel() for p in params)
    k = 13
    P, P64 = _basis(D, k, layout)
    space = sub.Subspace(P=P, mean_alpha=torch.randn(k, generator=torch.Generator().manual_seed(2)),
                         D=D)
    frozen = params[3].detach().clone()
    opt = TWA(params, space, lr=0.3, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    assert opt._fused is not None  # this setup takes the fused kernel
    # float64 evaluation of the same step, from the same start
    alpha, buf = opt.alpha.double().clone(), torch.zeros(k, dtype=torch.float64)
    for step in range(4):
        _grads(params, step)
        g = torch.cat([torch.zeros(p.numel(), dtype=torch.float64) if p.grad is None
                       or not p.requires_grad else p.grad.double().reshape(-1) for p in params])
        opt.step()
        c = P.double().T @ g
        d = c + wd * alpha
        if momentum:
            buf = momentum * buf + d
            d = d + momentum * buf if nesterov else buf
        alpha = alpha - 0.3 * d
        w = P.double() @ alpha
        scale = alpha.abs().max()
        assert torch.allclose(opt.alpha.double(), alpha, rtol=0, atol=1e-5 * scale), step
        if momentum:
            buf_ours = opt.state[params[0]]["momentum_buffer"].double()
            assert torch.allclose(buf_ours, buf, rtol=0, atol=1e-5 * buf.abs().max()), step
        offset = 0
        for i, p in enumerate(params):
            n = p.numel()
            want = frozen if i == 3 else w[offset:offset + n].view(p.shape)
            if i == 3:
                assert torch.equal(p.detach(), want)
            else:
                assert torch.allclose(p.detach().double(), want, rtol=0,
                                      atol=1e-5 * w.abs().max()), (step, i)
            offset += n
    assert int(opt.state["skipped"]) == 0 and opt.state["step"] == 4


def test_fused_step_matches_the_op_path():
    """The fused kernel and the op-by-op path (taken with an explicit backend) agree to float32
    rounding, step after step."""
    a, b = _params(), _params()
    D = sum(p.numel() for p in a)
    P, _ = _basis(D, 9, "columns")
    space = sub.Subspace(P=P, mean_alpha=torch.zeros(9), D=D)
    fused = TWA(a, space, lr=0.2, momentum=0.5, weight_decay=1e-3)
    plain = TWA(b, space, lr=0.2, momentum=0.5, weight_decay=1e-3, backend="native")
    assert fused._fused is not None and plain._fused is None
    for step in range(5):
        _grads(a, step)
        _grads(b, step)
        fused.step()
        plain.step()
        assert torch.allclose(fused.alpha, plain.alpha, rtol=1e-5, atol=1e-6), step
        for p, q in zip(a, b):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), step


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
def test_fused_step_skips_and_counts(bad):
    """A NaN/Inf gradient entry, or one whose ‖c‖² overflows float32 (1e30): nothing is
    written (weights, α, momentum buffer), the step is counted as skipped; a clean step
    afterwards trains."""
    params = _params()
    D = sum(p.numel() for p in params)
    P, _ = _basis(D, 6, "rows")
    opt = TWA(params, sub.Subspace(P=P, mean_alpha=torch.zeros(6), D=D), lr=0.1, momentum=0.9)
    _grads(params, 0)
    opt.step()
    before = [p.detach().clone() for p in params]
    alpha, buf = opt.alpha.clone(), opt.state[params[0]]["momentum_buffer"].clone()
    _grads(params, 1)
    params[2].grad[12345] = bad
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert torch.equal(opt.alpha, alpha)
    assert torch.equal(opt.state[params[0]]["momentum_buffer"], buf)
    assert int(opt.state["skipped"]) == 1 and opt.state["step"] == 2
    _grads(params, 2)
    opt.step()
    assert int(opt.state["skipped"]) == 1
    assert not torch.equal(params[0], before[0])


def test_non_contiguous_gradient_takes_the_op_path():
    """A gradient the fused kernel does not take (non-contiguous) runs the op-by-op step,
    with the same result as a contiguous copy of it through the fused kernel."""
    a, b = _params(), _params()
    D = sum(p.numel() for p in a)
    P, _ = _basis(D, 5, "columns")
    space = sub.Subspace(P=P, mean_alpha=torch.zeros(5), D=D)
    oa, ob = TWA(a, space, lr=0.2), TWA(b, space, lr=0.2)
    _grads(a, 0)
    _grads(b, 0)
    a[0].grad = a[0].grad.T.contiguous().T  # (3, 5) transposed storage
    oa.step()
    ob.step()
    assert torch.allclose(oa.alpha, ob.alpha, rtol=1e-5, atol=1e-6)
