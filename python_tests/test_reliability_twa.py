"""TWA reliability (issue 12 item 4): a step that cannot be taken (NaN, Inf or a loss × 1e30)
is skipped and counted and training continues exactly as if the batch had not been there;
resume in PyTorch's usual order is bit for bit; frozen parameters never move; bad
arguments raise errors that name them."""
import contextlib
import io
import random

import pytest
import torch

import lowrank_kernels as lk
import lowrank_kernels.subspace as sub
from lowrank_kernels.optim import TWA

pytestmark = pytest.mark.usefixtures("one_thread")

FAULTS = {"nan": float("nan"), "inf": float("inf"), "huge": 1e30}


def _mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(),
                               torch.nn.Linear(6, 3)).to(dtype)


def _batches(n, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 5, generator=g, dtype=dtype), torch.randint(0, 3, (8,), generator=g))
            for _ in range(n)]


def _space(model, k=4, dtype=torch.float32, seed=2):
    g = torch.Generator().manual_seed(seed)
    w = sub.flatten_parameters(model.parameters()).double()
    ckpts = [w + 0.1 * torch.randn(w.shape, generator=g, dtype=torch.float64) for _ in range(k)]
    return sub.build_subspace([c.to(next(model.parameters()).dtype) for c in ckpts],
                              dtype=dtype)


def _step(model, opt, batch, scale=1.0):
    x, y = batch
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y) * scale
    loss.backward()
    opt.step()


def _buffer(opt):
    return opt.state[opt.params[0]].get("momentum_buffer", torch.zeros_like(opt.alpha))


def _weights(model):
    return sub.flatten_parameters(model.parameters())


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
@pytest.mark.parametrize("p_dtype", [torch.float32, torch.float64], ids=["P32", "P64"])
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)],
                         ids=["sgd", "momentum", "nesterov"])
def test_faulty_steps_are_skipped_and_training_continues_exactly(strict, p_dtype, momentum,
                                                                 nesterov):
    """Faults (loss × NaN, × Inf, × 1e30) at seeded random steps, the first step among them:
    against a twin optimizer that never saw the faulty batches, the weights, α and the
    momentum buffer are bit-identical after every step, nothing non-finite ever reaches the
    weights, and state["skipped"] counts exactly the faulty steps."""
    batches = _batches(14)
    rng = random.Random(7)
    faults = {0: "nan"} | {s: rng.choice(sorted(FAULTS)) for s in rng.sample(range(1, 14), 5)}
    assert set(faults.values()) == set(FAULTS)  # every kind is injected
    model, twin = _mlp(), _mlp()
    space = _space(model, dtype=p_dtype)
    kw = dict(lr=0.2, momentum=momentum, nesterov=nesterov, weight_decay=1e-3)
    opt, opt_twin = TWA(model.parameters(), space, **kw), TWA(twin.parameters(), space, **kw)
    mode = lk.strict() if strict else contextlib.nullcontext()
    with mode:
        for step, batch in enumerate(batches):
            if step in faults:
                before = _weights(model).clone()
                _step(model, opt, batch, scale=FAULTS[faults[step]])
                assert torch.equal(_weights(model), before), (step, faults[step])
            else:
                _step(model, opt, batch)
                _step(twin, opt_twin, batch)
            assert bool(torch.isfinite(_weights(model)).all()), step
            assert torch.equal(_weights(model), _weights(twin)), step
            assert torch.equal(opt.alpha, opt_twin.alpha), step
            if momentum:  # a skipped first step leaves a zero buffer (μ·0 + d = d next)
                assert torch.equal(_buffer(opt), _buffer(opt_twin)), step
    assert int(opt.state["skipped"]) == len(faults) and int(opt_twin.state["skipped"]) == 0
    assert opt.state["step"] == 14 and opt_twin.state["step"] == 14 - len(faults)
    # the clean steps trained: the weights moved away from the start
    assert not torch.equal(_weights(model), space.P.to(torch.float32) @ space.mean_alpha.float())


def test_a_non_finite_gradient_in_one_parameter_skips_the_step():
    """A single NaN (or Inf) written into one .grad: the whole step (one α for all) is
    skipped; the next clean step is the one an untouched twin takes."""
    model, twin = _mlp(), _mlp()
    space = _space(model)
    opt, opt_twin = (TWA(m.parameters(), space, lr=0.3, momentum=0.5) for m in (model, twin))
    batches = _batches(3)
    _step(model, opt, batches[0])
    _step(twin, opt_twin, batches[0])
    for bad in (float("nan"), float("inf"), -float("inf")):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(batches[1][0]), batches[1][1]).backward()
        model[2].bias.grad[1] = bad
        before = _weights(model).clone()
        opt.step()
        assert torch.equal(_weights(model), before)
    assert int(opt.state["skipped"]) == 3
    _step(model, opt, batches[2])
    _step(twin, opt_twin, batches[2])
    assert torch.equal(_weights(model), _weights(twin))


def test_overflowing_weights_are_a_skip_float16():
    """float16 weights: a step whose P α overflows float16 (finite α, |w| > 65504) is
    skipped, the weights stay finite and unchanged."""
    model = _mlp(torch.float32)
    space = _space(model, dtype=torch.float32)
    model = model.half()
    opt = TWA(model.parameters(), space, lr=1e6)
    x, y = _batches(1, torch.float16)[0]
    before = _weights(model).clone()
    opt.zero_grad()
    (torch.nn.functional.cross_entropy(model(x).float(), y) * 1e3).backward()
    opt.step()
    assert int(opt.state["skipped"]) == 1
    assert torch.equal(_weights(model), before)


@pytest.mark.parametrize("p_dtype", [torch.float32, torch.float64], ids=["P32", "P64"])
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, True)],
                         ids=["sgd", "nesterov"])
def test_resume_in_the_usual_order_is_bit_identical(p_dtype, momentum, nesterov):
    """model.load_state_dict, then TWA(...) (whose init='mean' writes P α₀ into the model),
    then opt.load_state_dict: the continuation equals uninterrupted training bit for bit
    (weights, α in float64 for float32 weights, momentum buffer, counters), a skipped step
    before the checkpoint included."""
    batches = _batches(8)
    kw = dict(lr=0.2, momentum=momentum, nesterov=nesterov, weight_decay=1e-3)
    model = _mlp()
    space = _space(model, dtype=p_dtype)
    opt = TWA(model.parameters(), space, **kw)
    for i, batch in enumerate(batches[:4]):
        _step(model, opt, batch, scale=float("nan") if i == 2 else 1.0)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    for batch in batches[4:]:
        _step(model, opt, batch)

    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = _mlp(seed=5)  # other initial weights: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt2 = TWA(resumed.parameters(), space, **kw)
    opt2.load_state_dict(saved["opt"])
    assert opt2.alpha.dtype == (torch.float64 if p_dtype == torch.float64 else torch.float32)
    for batch in batches[4:]:
        _step(resumed, opt2, batch)
    assert torch.equal(_weights(resumed), _weights(model))
    assert torch.equal(opt2.alpha, opt.alpha)
    if momentum:
        assert torch.equal(opt2.state[opt2.params[0]]["momentum_buffer"],
                           opt.state[opt.params[0]]["momentum_buffer"])
    assert opt2.state["step"] == opt.state["step"] == 8
    assert int(opt2.state["skipped"]) == int(opt.state["skipped"]) == 1


def test_load_state_dict_rejects_a_foreign_state():
    model = _mlp()
    opt = TWA(model.parameters(), _space(model), lr=0.1)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _step(model, sgd, _batches(1)[0])
    with pytest.raises(ValueError, match=r"no 'alpha'"):
        opt.load_state_dict(sgd.state_dict())
    other = TWA(model.parameters(), _space(model, k=3), lr=0.1)
    with pytest.raises(ValueError, match=r"saved alpha has shape \(3,\), this subspace has "
                                         r"k = 4"):
        opt.load_state_dict(other.state_dict())


def test_frozen_parameters_never_move():
    """The first layer frozen (and one stale .grad left on it): after steps it is bit-identical;
    the trainable rows follow projected SGD on α with only the trainable rows of P,
    against a float64 reference, and every trainable parameter moved."""
    model = _mlp(torch.float64)
    space = _space(model, dtype=torch.float64)
    frozen = list(model[0].parameters())
    for p in frozen:
        p.requires_grad_(False)
    frozen_before = [p.clone() for p in frozen]
    lr, mu = 0.3, 0.9
    opt = TWA(model.parameters(), space, lr=lr, momentum=mu)
    for p, b in zip(frozen, frozen_before):  # the constructor's write-back skipped them
        assert torch.equal(p, b)
    n_frozen = sum(p.numel() for p in frozen)
    P_t = space.P[n_frozen:]  # trainable rows
    alpha = space.mean_alpha.clone()
    buf = torch.zeros_like(alpha)
    frozen[0].grad = torch.ones_like(frozen[0])  # stale: must be ignored
    trainable_start = [p.clone() for p in model[2].parameters()]
    for batch in _batches(4, torch.float64):
        x, y = batch
        for p in model[2].parameters():
            p.grad = None
        torch.nn.functional.cross_entropy(model(x), y).backward()
        g_t = sub.flatten_parameters(p.grad for p in model[2].parameters())
        buf = mu * buf + P_t.T @ g_t
        alpha = alpha - lr * buf
        opt.step()
        for p, b in zip(frozen, frozen_before):
            assert torch.equal(p, b)
        torch.testing.assert_close(sub.flatten_parameters(model[2].parameters()), P_t @ alpha,
                                   rtol=1e-12, atol=1e-13)
    assert all(not torch.equal(p, b) for p, b in zip(model[2].parameters(), trainable_start))
    assert int(opt.state["skipped"]) == 0


def test_freezing_after_construction_is_respected():
    model = _mlp()
    opt = TWA(model.parameters(), _space(model), lr=0.5)
    model[2].weight.requires_grad_(False)
    before = model[2].weight.clone()
    for batch in _batches(3):
        _step(model, opt, batch)
    assert torch.equal(model[2].weight, before)


def _bad_twa_cases(model, space, D):
    params = lambda: model.parameters()  # noqa: E731
    eye = torch.eye(D)
    return [
        (dict(lr=True), TypeError, r"TWA: lr must be a real number, got bool True"),
        (dict(lr="0.1"), TypeError, r"TWA: lr must be a real number, got str"),
        (dict(lr=float("nan")), ValueError, r"TWA: lr must be positive \(finite, > 0\), got nan"),
        (dict(lr=float("inf")), ValueError, r"TWA: lr must be positive"),
        (dict(lr=-1), ValueError, r"TWA: lr must be positive"),
        (dict(lr=0.1, momentum=True), TypeError, r"TWA: momentum must be a real number"),
        (dict(lr=0.1, momentum=-0.5), ValueError, r"TWA: momentum must be ≥ 0 and finite"),
        (dict(lr=0.1, weight_decay=float("inf")), ValueError,
         r"TWA: weight_decay must be ≥ 0 and finite, got inf"),
        (dict(lr=0.1, weight_decay=None), TypeError, r"TWA: weight_decay must be a real"),
        (dict(lr=0.1, momentum=0.9, nesterov=1), TypeError, r"TWA: nesterov must be a bool"),
        (dict(lr=0.1, nesterov=True), ValueError, r"TWA: nesterov needs momentum > 0"),
        (dict(lr=0.1, chunk_rows=0), ValueError, r"TWA: chunk_rows must be a positive int"),
        (dict(lr=0.1, chunk_rows=True), ValueError, r"TWA: chunk_rows must be a positive int"),
        (dict(lr=0.1, chunk_rows=2.5), ValueError, r"TWA: chunk_rows must be a positive int"),
        (dict(lr=0.1, backend=3), TypeError, r"TWA: backend must be None or a backend name"),
        (dict(subspace="P", lr=0.1), TypeError, r"TWA: subspace must be a Subspace"),
        (dict(subspace=torch.ones(D), lr=0.1), ValueError, r"TWA: subspace must be a "
                                                            r"Subspace or a D x k basis P, got "
                                                            r"shape \(57,\)"),
        (dict(subspace=torch.ones(D, 2, dtype=torch.int64), lr=0.1, init="current"),
         TypeError, r"TWA: subspace.P must be a 2-D floating-point tensor"),
        (dict(subspace=torch.ones(D, 0), lr=0.1, init="current"), ValueError,
         r"TWA: the subspace must have k >= 1 directions"),
        (dict(subspace=eye.index_fill(0, torch.tensor([3]), float("nan")), lr=0.1,
              init="current"), ValueError, r"TWA: subspace.P contains non-finite values"),
        (dict(subspace=torch.eye(5), lr=0.1, init="current"), ValueError,
         r"TWA: the parameters hold 57 values but the subspace was built for D = 5"),
        (dict(lr=0.1, init="last"), ValueError, r"TWA: init must be 'mean', 'current' or a "
                                                r"k-vector, got 'last'"),
        (dict(lr=0.1, init=torch.zeros(3)), ValueError, r"TWA: init must have k = 4 "
                                                        r"coordinates, got \(3,\)"),
        (dict(lr=0.1, init=torch.zeros(4, dtype=torch.int64)), TypeError,
         r"TWA: init must be a floating-point k-vector"),
        (dict(lr=0.1, init=torch.tensor([0.0, float("nan"), 0.0, 0.0])), ValueError,
         r"TWA: the initial coordinates α₀ \(init='a tensor'\) contain non-finite values"),
        (dict(params=[{"params": list(model[0].parameters())},
                      {"params": list(model[2].parameters())}], lr=0.1), ValueError,
         r"TWA: params must form one parameter group"),
        (dict(params=[torch.zeros(D, dtype=torch.int64)], lr=0.1, init="current",
              subspace=eye), TypeError, r"TWA: params\[0\] must be a floating-point tensor"),
    ], params


def test_bad_arguments_name_the_argument():
    model = _mlp()
    space = _space(model)
    D = sum(p.numel() for p in model.parameters())
    cases, params = _bad_twa_cases(model, space, D)
    for kwargs, error, message in cases:
        kwargs = dict(kwargs)
        args = (kwargs.pop("params", None) or params(), kwargs.pop("subspace", space))
        with pytest.raises(error, match=message):
            TWA(*args, **kwargs)
    # init='current' with non-finite weights
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"init='current'\) contain non-finite values"):
        TWA(model.parameters(), space, lr=0.1, init="current")
