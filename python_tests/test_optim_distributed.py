"""FNGD, SENG and KFAC data parallel on 2 and 4 gloo processes (CPU, float64): each rank holds
B/R samples of the global batch, the model is wrapped in DistributedDataParallel (or bare,
given the process group), and every step's update equals the single-process update on the
global batch — first-epoch and refresh steps (factors gathered), reuse steps (U c all-reduced,
or carried by DDP's own all-reduce), SENG's refresh and between-refresh steps, KFAC's factor
all-reduce and spread inverses; SENG with update_freq=1 sends its sketched layers' sketches
(the volume checked); FNGD with unequal local batches (3 and 5 samples). A checkpoint saved on
rank 0 and loaded on every rank of a new process group resumes bit for bit. Rendezvous,
teardown and deadlines: gloo.py."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lowrank_kernels.optim import FNGD, KFAC, SENG

import gloo

GLOBAL_BATCH = 8
RESUME_AT = 3


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(18, 6), nn.Tanh(),
                         nn.Linear(6, 3)).double()


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(GLOBAL_BATCH, 1, 5, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (GLOBAL_BATCH,), generator=g))


# name: (optimizer factory (model, **distributed kwargs), steps, wrap in DDP)
CASES = {
    # steps 0-1 epoch 0 (solve), 2-3 reuse, 4-5 refresh (epoch 2), 6 reuse
    "fngd_layer": (lambda m, **kw: FNGD(m, lr=0.1, damping=0.3, steps_per_epoch=2,
                                        momentum=0.9, weight_decay=1e-3, refresh_every=2, **kw),
                   7, True),
    "fngd_model": (lambda m, **kw: FNGD(m, lr=0.1, damping=0.3, steps_per_epoch=2,
                                                 blocks="model", reuse="per_step",
                                                 momentum=0.5, **kw),
                            5, True),
    "fngd_bare_group": (lambda m, **kw: FNGD(m, lr=0.1, damping=0.3, steps_per_epoch=2,
                                             momentum=0.9, **kw), 5, False),
    # refresh at 0, 2, 4; sketched Grams for the three 18+-entry weights
    "seng": (lambda m, **kw: SENG(m, lr=0.1, damping=0.2, update_freq=2, momentum=0.9,
                                  weight_decay=1e-3, sketch_threshold=15, sketch_size=3,
                                  **kw), 5, True),
    # update_freq=1 and sketched layers: the ranks exchange the sketches, not the factors
    "seng_sketched": (lambda m, **kw: SENG(m, lr=0.1, damping=0.2, momentum=0.9,
                                           weight_decay=1e-3, sketch_threshold=15,
                                           sketch_size=3, **kw), 4, True),
    "seng_sketched_bare_group": (lambda m, **kw: SENG(m, lr=0.1, damping=0.2, momentum=0.5,
                                                      sketch_threshold=15, sketch_size=3,
                                                      **kw), 4, False),
    "kfac": (lambda m, **kw: KFAC(m, lr=0.1, damping=0.5, inverse_every=2, momentum=0.9,
                                  kl_clip=1e-2, **kw), 5, True),
}


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _train(name, model, opt, steps, first, rows, bare_group):
    """[θ after each step] and [bytes of each step] (optimizer's, DDP's, the optimizer's
    description part)."""
    thetas, traffic = [], []
    for step in range(first, steps):
        x, y = _batch(step)
        before = opt.data_parallel.counters() if opt.data_parallel else None
        opt.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()
        thetas.append(_flat(model).clone())
        if before is not None:
            after = opt.data_parallel.counters()
            traffic.append(tuple(after[k] - before[k]
                                 for k in ("bytes", "ddp_bytes", "meta_bytes")))
    return thetas, traffic


def _build(name, rank, world, mode="auto"):
    factory, steps, ddp = CASES[name]
    base = _model()
    model = nn.parallel.DistributedDataParallel(base) if ddp else base
    kw = {"distributed": mode}
    if not ddp:
        kw["process_group"] = dist.group.WORLD
    return model, base, factory(model, **kw), steps, not ddp


def _worker(rank, world, init_file, out_dir, phase):
    with gloo.process_group(rank, world, init_file):
        b = GLOBAL_BATCH // world
        rows = slice(rank * b, (rank + 1) * b)
        results = {}
        for name in CASES:
            model, base, opt, steps, bare = _build(name, rank, world)
            if phase == "train":
                thetas, traffic = _train(name, model, opt, RESUME_AT, 0, rows, bare)
                if rank == 0:  # saved on one rank
                    torch.save({"model": base.state_dict(), "opt": opt.state_dict()},
                               os.path.join(out_dir, f"{name}.ckpt"))
                more, traffic2 = _train(name, model, opt, steps, RESUME_AT, rows, bare)
                results[name] = {"thetas": thetas + more, "traffic": traffic + traffic2}
            else:  # resume: loaded on every rank of a new process group
                dist.barrier()
                ckpt = torch.load(os.path.join(out_dir, f"{name}.ckpt"))
                base.load_state_dict(ckpt["model"])
                opt.load_state_dict(ckpt["opt"])
                thetas, _ = _train(name, model, opt, steps, RESUME_AT, rows, bare)
                results[name] = {"thetas": thetas}
            opt.close()
        if phase == "train" and world == 2:  # local approximation: its first step vs exact
            model, base, opt, _, _ = _build("fngd_layer", rank, world, mode="local")
            start = _flat(model).clone()
            _train("fngd_layer", model, opt, 1, 0, rows, False)
            results["local_step"] = _flat(model) - start
            opt.close()
            results["unequal"] = _unequal(rank, world)
        torch.save(results, os.path.join(out_dir, f"{phase}{rank}.pt"))


UNEQUAL = (3, 5)  # the two ranks' local batch sizes (global batch GLOBAL_BATCH)


def _sizes_rows(rank, sizes):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _unequal(rank, world):
    """FNGD with local batches of 3 and 5 samples; then sizes that swap at a reuse step."""
    rows = _sizes_rows(rank, UNEQUAL)
    results = {}
    for name in ("fngd_layer", "fngd_model", "fngd_bare_group"):
        model, _, opt, steps, bare = _build(name, rank, world)
        results[name] = _train(name, model, opt, steps, 0, rows, bare)[0]
        opt.close()
    model, _, opt, _, _ = _build("fngd_layer", rank, world)
    _train("fngd_layer", model, opt, 2, 0, rows, False)  # epoch 0 at sizes (3, 5)
    try:  # every rank sees its size change before any collective of the step
        _train("fngd_layer", model, opt, 3, 2, _sizes_rows(rank, UNEQUAL[::-1]), False)
    except ValueError as error:
        results["error"] = str(error)
    opt.close()
    return results


def _single(name):
    """The single-process θ after each step on the global batches."""
    factory, steps, _ = CASES[name]
    model = _model()
    opt = factory(model)
    thetas = []
    for step in range(steps):
        x, y = _batch(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        thetas.append(_flat(model).clone())
    opt.close()
    return thetas


def _updates(thetas):
    start = _flat(_model())
    return [t - s for t, s in zip(thetas, [start] + thetas[:-1])]


@pytest.fixture(scope="module")
def single():
    return {name: _single(name) for name in CASES}


def _run(tmp_path, world, phase):
    gloo.spawn(_worker, (world, str(tmp_path / f"store_{phase}"), str(tmp_path), phase), world)
    return [torch.load(tmp_path / f"{phase}{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    path = tmp_path_factory.mktemp("ranks2")
    return path, _run(path, 2, "train")


def _check_updates(thetas, reference, label):
    """Every step's update within 1e-10 (relative) of the single-process one."""
    got, reference = _updates(thetas), _updates(reference)
    assert len(got) == len(reference)
    for step, (u, v) in enumerate(zip(got, reference)):
        rel = float((u - v).norm() / v.norm())
        assert rel <= 1e-10, f"{label} step {step}: relative {rel:.3g}"


def _check_equal_to_single(ranks, single):
    for name in CASES:
        for r, result in enumerate(ranks):
            _check_updates(result[name]["thetas"], single[name], f"{name} rank {r}")
        for result in ranks[1:]:  # every rank holds the same weights
            for a, b in zip(result[name]["thetas"], ranks[0][name]["thetas"]):
                assert torch.equal(a, b), name


def test_two_gloo_processes_match_single_process_on_global_batch(two, single):
    _check_equal_to_single(two[1], single)


def test_four_gloo_processes_match_single_process_on_global_batch(tmp_path, single):
    _check_equal_to_single(_run(tmp_path, 4, "train"), single)


def test_fngd_reuse_step_communicates_no_more_than_ddp(two):
    ranks = two[1]
    grad_bytes = sum(p.numel() * 8 for p in _model().parameters())  # float64
    for name, reuse_steps in (("fngd_layer", (2, 3, 6)), ("fngd_model", (2, 3)),
                              ("fngd_bare_group", (2, 3, 4))):
        for step in reuse_steps:
            own, ddp, _ = ranks[0][name]["traffic"][step]
            assert own + ddp == grad_bytes, (name, step, own, ddp)
    own, ddp, _ = ranks[0]["fngd_layer"]["traffic"][0]  # a solve step gathers the factors
    assert ddp == grad_bytes and own > 0


def _values_per_sample(sketch):
    """Values per sample in the captured factors of _model() (Factors.state_dict), with the
    seng_sketched case's sketches (weights > 15 entries, 3 columns a side) where sketch."""
    from lowrank_kernels.capture import Capture
    model = _model()
    x, y = _batch(0)
    with Capture(model) as capture:
        F.cross_entropy(model(x), y).backward()
        factors = capture.factors()
    total = 0
    for p, f in factors.items():
        if sketch and p.numel() > 15:
            f = f.sketch(3, 0)
        total += sum(v[0].numel() for d in f.state_dict() for v in d.values()
                     if isinstance(v, torch.Tensor))
    return total


def test_seng_sketched_layers_send_sketches_not_factors(two):
    """update_freq=1: each step all-gathers the sketched layers' sketches (and the other
    parameters' factors) and all-reduces the directions in place of DDP's all-reduce."""
    D = sum(p.numel() for p in _model().parameters())
    sketched, full = _values_per_sample(True), _values_per_sample(False)
    assert sketched < full
    for name in ("seng_sketched", "seng_sketched_bare_group"):
        for step, (own, ddp, meta) in enumerate(two[1][0][name]["traffic"]):
            assert ddp == 0, (name, step)
            assert own - meta == 8 * (D + GLOBAL_BATCH * sketched), (name, step, own, meta)


def test_unequal_local_batches_match_single_process_and_a_changed_size_is_refused(two, single):
    """Local batches of 3 and 5: first-epoch, reuse and refresh steps equal the single-process
    update on the 8 samples (each rank's rows of c from the sizes recorded in the first
    epoch); a reuse step whose sizes differ from the recorded ones raises, naming them."""
    ranks = [result["unequal"] for result in two[1]]
    for name in ("fngd_layer", "fngd_model", "fngd_bare_group"):
        for r, result in enumerate(ranks):
            _check_updates(result[name], single[name], f"{name} rank {r} (sizes {UNEQUAL})")
    for r, result in enumerate(ranks):
        message = result.get("error", "")
        assert f"has {UNEQUAL[::-1][r]} samples on rank {r}" in message, message
        assert str(list(UNEQUAL)) in message, message


def test_resume_from_rank0_checkpoint_is_bit_identical(two):
    path, ranks = two
    resumed = _run(path, 2, "resume")
    for name in CASES:
        for r in range(2):
            for a, b in zip(resumed[r][name]["thetas"], ranks[r][name]["thetas"][RESUME_AT:]):
                assert torch.equal(a, b), f"{name} rank {r}"


def test_local_mode_is_an_approximation_close_to_exact(two, single):
    ranks = two[1]
    exact = _updates(single["fngd_layer"])[0]
    local = ranks[0]["local_step"]
    assert torch.equal(local, ranks[1]["local_step"])  # the ranks stay in sync
    cosine = float(local @ exact / (local.norm() * exact.norm()))
    assert 0.5 < cosine < 1 - 1e-8, cosine  # close, but not the exact direction
