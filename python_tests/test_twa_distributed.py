"""TWA's parallel scheme on 2 gloo processes (CPU): P's rows sharded across the ranks, the
k-vector Pᵀ g all-reduced and P α all-gathered, gives the weights of single-process TWA."""
import os

import torch

import gloo
import lowrank_kernels.subspace as sub
from lowrank_kernels.optim import TWA

WORLD = 2


def _setup(seed=0):
    """The same model (D = 57: uneven shards 29 + 28), checkpoints and batch on every rank."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 3)).double()
    w = sub.flatten_parameters(model.parameters())
    g = torch.Generator().manual_seed(seed + 1)
    ckpts = [w + 0.1 * torch.randn(w.shape, generator=g, dtype=w.dtype) for _ in range(4)]
    x = torch.randn(9, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=g)
    return model, ckpts, x, y


def _run(model, space, x, y, steps=3):
    opt = TWA(model.parameters(), space, lr=0.3, momentum=0.9, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return sub.flatten_parameters(model.parameters()), opt


def _worker(rank, init_file, out_dir):
    """One rank (teardown ordered by gloo.process_group)."""
    with gloo.process_group(rank, WORLD, init_file):
        model, ckpts, x, y = _setup()
        space = sub.build_subspace(ckpts, dtype=torch.float64, shard=True)
        w, opt = _run(model, space, x, y)
        torch.save({"w": w, "rows": space.P.shape[0], "start": space.start,
                    "stop": space.stop, "gram": space.P.T @ space.P},
                   os.path.join(out_dir, f"rank{rank}.pt"))


def test_sharded_twa_on_two_gloo_processes_matches_single_process(tmp_path):
    gloo.spawn(_worker, (str(tmp_path / "store"), str(tmp_path)), WORLD)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert [(r["start"], r["stop"], r["rows"]) for r in results] == [(0, 29, 29), (29, 57, 29)]
    # The shards' columns are orthonormal together: the Grams of the row blocks sum to I.
    torch.testing.assert_close(results[0]["gram"] + results[1]["gram"],
                               torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-13)
    model, ckpts, x, y = _setup()
    w_single, _ = _run(model, sub.build_subspace(ckpts, dtype=torch.float64), x, y)
    for r in results:  # every rank holds the whole, identical weight vector
        torch.testing.assert_close(r["w"], w_single, rtol=1e-12, atol=1e-12)
