"""FNGD / SENG / KFAC directions against float64 oracles: per-sample gradients from
torch.func and dense solves of (F + λI) d = ḡ, F = UUᵀ/B (block-diagonal per layer where the
method is). With lr = 1 and no momentum the update is θ ← θ − d, so d = θ_before − θ_after.
Float64 throughout: the only differences are the orders of summation and the B×B vs D×D
solves of well-conditioned systems (cond ≤ (‖K‖ + λB)/λB ≈ 10³ here), so 1e-10 is tight."""
import math

import pytest
import torch
import torch.nn.functional as F

import lowrank_kernels as lk
from lowrank_kernels.capture import Capture
from lowrank_kernels.optim import FNGD, KFAC, SENG
from lowrank_kernels.sketch.per_sample import output_side_seed

import optim_reference as ref

TOL = 1e-10
LAM = 0.05


def _step(model, opt, x, y):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    return {n: before[n] - p.detach() for n, p in model.named_parameters()}


def _grads(opt, model, x, y):
    """Per-sample gradients with the optimizer's capture paused (torch.func re-runs the model)."""
    with opt.capture.paused():
        return ref.per_sample_grads(model, x, y)


def _check_blocks(model, update, grads, by_layer, lam=LAM, v_of=None):
    for names in ref.blocks(model, by_layer):
        U = ref.stacked(grads, names)
        v = None if v_of is None else v_of(names)
        d = ref.split(ref.natural_gradient(U, lam, v), grads, names)
        for n in names:
            assert ref.relative_error(update[n], d[n]) < TOL, n


@pytest.mark.parametrize("make", [ref.mlp, ref.cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("blocks", ["layer", "model"])
def test_fngd_first_epoch_is_natural_gradient(make, blocks):
    model = make()
    opt = FNGD(model, lr=1.0, damping=LAM, steps_per_epoch=3, blocks=blocks)
    for seed, B in [(1, 7), (2, 5)]:  # two batches, different sizes
        x, y = ref.batch(model, B, seed)
        grads = _grads(opt, model, x, y)
        update = _step(model, opt, x, y)
        _check_blocks(model, update, grads, blocks == "layer")
    assert int(opt.state["fallbacks"]) == 0


def _coefficients(model, grads, B, lam, names):
    U = ref.stacked(grads, names)
    K = U @ U.T
    eye, ones = torch.eye(B, dtype=K.dtype), torch.ones(B, dtype=K.dtype)
    return torch.linalg.solve(K + lam * B * eye, ones)


@pytest.mark.parametrize("reuse", ["mean", "per_step"])
def test_fngd_reuses_first_epoch_coefficients(reuse):
    """Epoch 0 = steps 0, 1 (batch sizes 6, 4); steps 2, 3 reuse w = B·c (see FNGD)."""
    model = ref.mlp()
    opt = FNGD(model, lr=1.0, damping=LAM, steps_per_epoch=2, reuse=reuse)
    sizes = [6, 4, 6, 5]
    ws = {}
    for step, B in enumerate(sizes):
        x, y = ref.batch(model, B, 10 + step)
        grads = _grads(opt, model, x, y)
        for names in ref.blocks(model):
            if step < 2:
                ws[(step, names[0])] = B * _coefficients(model, grads, B, LAM, names)
        update = _step(model, opt, x, y)
        if step < 2:
            continue
        assert not opt.computing()
        for names in ref.blocks(model):
            w0, w1 = ws[(0, names[0])], ws[(1, names[0])]
            if reuse == "mean":
                w = torch.cat([(w0[:4] + w1) / 2, w0[4:6]])  # positions 4, 5: batch 0 only
                w = w[:B]
            else:
                w = w0[:B] if step % 2 == 0 else torch.cat([w1, w1.mean().expand(B - 4)])
            U = ref.stacked(grads, names)
            expect = ref.split(U.T @ (w / B), grads, names)
            for n in names:
                assert ref.relative_error(update[n], expect[n]) < TOL, (step, n)


def test_fngd_refresh_every_recomputes():
    model = ref.mlp()
    opt = FNGD(model, lr=1.0, damping=LAM, steps_per_epoch=1, refresh_every=2)
    assert [opt.computing(s) for s in range(5)] == [True, False, True, False, True]
    for step in range(3):
        x, y = ref.batch(model, 5, 20 + step)
        grads = _grads(opt, model, x, y)
        update = _step(model, opt, x, y)
    _check_blocks(model, update, grads, True)  # step 2 solved its own batch


@pytest.mark.parametrize("make", [ref.mlp, ref.cnn], ids=["mlp", "cnn"])
def test_seng_refresh_and_kept_curvature(make):
    """update_freq=2: step 0 uses its batch (d = U c); step 1 preconditions its mean gradient
    with step 0's curvature: d = (F₀ + λI)⁻¹ ḡ₁."""
    model = make()
    opt = SENG(model, lr=1.0, damping=LAM, momentum=0.0, update_freq=2)
    x0, y0 = ref.batch(model, 7, 1)
    grads0 = _grads(opt, model, x0, y0)
    update = _step(model, opt, x0, y0)
    _check_blocks(model, update, grads0, True)
    x1, y1 = ref.batch(model, 4, 2)  # another batch size
    grads1 = _grads(opt, model, x1, y1)
    update = _step(model, opt, x1, y1)
    for names in ref.blocks(model):
        U0 = ref.stacked(grads0, names)
        d = ref.split(ref.natural_gradient(U0, LAM, ref.stacked(grads1, names).mean(0)),
                      grads0, names)
        for n in names:
            assert ref.relative_error(update[n], d[n]) < TOL, n
    assert int(opt.state["fallbacks"]) == 0


def test_seng_damping_schedule():
    model = ref.mlp()
    opt = SENG(model, lr=1.0, damping=LAM, momentum=0.0, damping_schedule=lambda t: 0.1 / (1 + t))
    for step in range(2):
        x, y = ref.batch(model, 6, 30 + step)
        grads = _grads(opt, model, x, y)
        update = _step(model, opt, x, y)
        _check_blocks(model, update, grads, True, lam=0.1 / (1 + step))


def test_seng_sketched_gram_is_gram_of_sketched_gradients():
    """Above the threshold K̃ = Gram of g̃_i = Ω_outᵀ g_i Ω_in (Ω Rademacher / √k from
    sketch_omega, the seeds of sketch.kronecker_sketch); the direction is then the exact
    U (K̃ + λB)⁻¹ 1."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(9, 11), torch.nn.Tanh(),
                                torch.nn.Linear(11, 3)).double()
    k = 4
    opt = SENG(model, lr=1.0, damping=LAM, momentum=0.0, sketch_threshold=50, sketch_size=k,
               seed=5)
    x, y = ref.batch(ref.mlp(), 6, 3)
    x = torch.cat([x, x[:, :4]], 1)
    grads = _grads(opt, model, x, y)
    sketched = {}

    def spy(contribution_list, size, seed):
        out = original(contribution_list, size, seed)
        sketched["seed"] = seed
        return out

    import lowrank_kernels.optim.seng as seng_module
    original = seng_module.sketched_gram
    seng_module.sketched_gram = spy
    try:
        update = _step(model, opt, x, y)
    finally:
        seng_module.sketched_gram = original
    seed = sketched["seed"]  # only "0.weight" (99 > 50 entries) is sketched
    G = grads["0.weight"]  # (B, 11, 9)
    omega = lambda n, s: lk.sketch_omega(torch.arange(n), k, s, "rademacher",
                                         backend="reference").double() / math.sqrt(k)
    Gs = torch.einsum("eo,bei,ia->boa", omega(11, output_side_seed(seed)), G,
                      omega(9, seed)).flatten(1)
    Gb = grads["0.bias"]
    K = Gs @ Gs.T + Gb @ Gb.T
    B = 6
    c = torch.linalg.solve(K + LAM * B * torch.eye(B, dtype=K.dtype), torch.ones(B, dtype=K.dtype))
    for n in ["0.weight", "0.bias"]:
        expect = torch.einsum("b,b...->...", c, grads[n])
        assert ref.relative_error(update[n], expect) < TOL, n
    _check_blocks(torch.nn.Sequential(*[model[2]]), {"0.weight": update["2.weight"],
                                                     "0.bias": update["2.bias"]},
                  {"0.weight": grads["2.weight"], "0.bias": grads["2.bias"]}, True)


@pytest.mark.parametrize("make", [ref.mlp, ref.cnn], ids=["mlp", "cnn"])
def test_kfac_direction(make):
    """Two steps (factor_decay β, inverses at step 0 only when inverse_every=5): the direction
    of step 1 is G⁻¹[∇W ∇b]A⁻¹ with A, G the β-averages of the two batches and the inverses of
    step 0's factors."""
    model = make()
    beta, lam = 0.7, 1e-2
    opt = KFAC(model, lr=1.0, damping=lam, momentum=0.0, factor_decay=beta, inverse_every=5)
    layers = [m for m in model if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    tokens = {}

    def record(m, inp, out):
        out.register_hook(lambda e: tokens.setdefault(m, []).append((inp[0].detach(), e)))

    hooks = [m.register_forward_hook(record) for m in layers]
    factors, inverses = {}, {}
    for step, (B, seed) in enumerate([(6, 1), (5, 2)]):
        x, y = ref.batch(model, B, seed)
        tokens.clear()
        before = {m: (m.weight.detach().clone(), m.bias.detach().clone()) for m in layers}
        F.cross_entropy(model(x), y).backward()
        grads = {m: (m.weight.grad.clone(), m.bias.grad.clone()) for m in layers}
        opt.step()
        opt.zero_grad()
        for m in layers:
            (a, e), = tokens[m]
            e = e * B  # per-sample loss gradient (mean reduction)
            if isinstance(m, torch.nn.Conv2d):
                a = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)
                a = a.transpose(1, 2).reshape(-1, a.shape[1])
                e = e.flatten(2).transpose(1, 2).reshape(-1, e.shape[1])
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
            A, G = a.T @ a / a.shape[0], e.T @ e / B
            name = next(n for n, mm in model.named_modules() if mm is m)
            if step == 0:
                factors[m] = (A, G)
                pi = math.sqrt((A.diagonal().mean() / G.diagonal().mean()).item())
                eye = lambda M: torch.eye(len(M), dtype=M.dtype)
                inverses[m] = (torch.linalg.inv(A + pi * math.sqrt(lam) * eye(A)),
                               torch.linalg.inv(G + math.sqrt(lam) / pi * eye(G)))
            else:
                A0, G0 = factors[m]
                layer = opt.state["kfac"][name]
                assert ref.relative_error(layer["A"], beta * A0 + (1 - beta) * A) < TOL
                assert ref.relative_error(layer["G"], beta * G0 + (1 - beta) * G) < TOL
            Ainv, Ginv = inverses[m]
            gw, gb = grads[m]
            d = Ginv @ torch.cat([gw.reshape(gw.shape[0], -1), gb[:, None]], 1) @ Ainv
            dw = before[m][0] - m.weight.detach()
            db = before[m][1] - m.bias.detach()
            assert ref.relative_error(dw, d[:, :-1].reshape(dw.shape)) < TOL
            assert ref.relative_error(db, d[:, -1]) < TOL
    for h in hooks:
        h.remove()


def test_built_from_params_and_capture_with_groups():
    """FNGD(params, capture=...) with two param groups: each group's lr scales its update."""
    model = ref.mlp()
    cap = Capture(model)
    groups = [{"params": list(model[0].parameters()), "lr": 0.5},
              {"params": list(model[2].parameters())}]
    opt = FNGD(groups, lr=1.0, damping=LAM, steps_per_epoch=4, capture=cap)
    x, y = ref.batch(model, 6, 4)
    grads = _grads(opt, model, x, y)
    update = _step(model, opt, x, y)
    update["0.weight"], update["0.bias"] = 2 * update["0.weight"], 2 * update["0.bias"]
    _check_blocks(model, update, grads, True)


def test_seng_sketched_conv_gram_mixes_channels():
    """A sketched Conv2d: g̃_i = S_out g_i (S_in ⊗ I_kh·kw)ᵀ (channels mixed by Ω/√s), K̃ its
    Gram plus the exact bias Gram; d = U (K̃ + λB)⁻¹ 1 with the exact U."""
    model = ref.cnn()
    k, B = 2, 5
    opt = SENG(model, lr=1.0, damping=LAM, momentum=0.0, sketch_threshold=50, sketch_size=k,
               seed=3)
    seeds = []
    import lowrank_kernels.optim.seng as seng_module
    original = seng_module.sketched_gram

    def spy(contribution_list, size, seed):
        seeds.append(seed)
        return original(contribution_list, size, seed)

    seng_module.sketched_gram = spy
    try:
        x, y = ref.batch(model, B, 8)
        grads = _grads(opt, model, x, y)
        update = _step(model, opt, x, y)
    finally:
        seng_module.sketched_gram = original
    (seed,) = seeds  # only "0.weight" (3·2·3·3 = 54 > 50 entries) is sketched
    omega = lambda n, s: lk.sketch_omega(torch.arange(n), min(k, n), s, "rademacher",
                                         backend="reference").double() / math.sqrt(min(k, n))
    G = grads["0.weight"]  # (B, 3, 2, 3, 3)
    Gs = torch.einsum("oa,boihw,ic->bachw", omega(3, output_side_seed(seed)), G,
                      omega(2, seed)).flatten(1)
    K = Gs @ Gs.T + grads["0.bias"] @ grads["0.bias"].T
    c = torch.linalg.solve(K + LAM * B * torch.eye(B, dtype=K.dtype), torch.ones(B, dtype=K.dtype))
    for n in ["0.weight", "0.bias"]:
        expect = torch.einsum("b,b...->...", c, grads[n])
        assert ref.relative_error(update[n], expect) < TOL, n
