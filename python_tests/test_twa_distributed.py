"""TWA's parallel scheme on 2 gloo processes (CPU): P's rows sharded across the ranks, the
k-vector Pᵀ g all-reduced and P α all-gathered, gives the weights of single-process TWA."""
import datetime
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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


def _loopback_interface():
    """The loopback interface's name ('lo' on Linux, 'lo0' on macOS), or None."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (AttributeError, OSError):
        return None
    return next((n for n in names if n.startswith("lo")), None)


def _worker(rank, init_file, out_dir):
    """One rank. The teardown is ordered so that no rank leaves while its peer still has a
    gloo collective in flight, and no rank exits with a live process group:

    - the last collective (TWA's all_gather) is followed by a barrier: once a rank is past
      it, every rank has finished all its collectives, so destroy_process_group cannot pull
      a connection out from under a peer's pending read;
    - destroy_process_group runs on every exit path (a gloo group still alive at interpreter
      shutdown aborts the process: "terminate called without an active exception");
    - traffic stays on the loopback interface (GLOO_SOCKET_IFNAME, this child only) rather
      than whatever the hostname resolves to, and the rendezvous is a FileStore in the
      test's own tmp_path: no port to choose, none to race for."""
    torch.set_num_threads(1)
    loopback = _loopback_interface()
    if loopback is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = loopback
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        model, ckpts, x, y = _setup()
        space = sub.build_subspace(ckpts, dtype=torch.float64, shard=True)
        w, opt = _run(model, space, x, y)
        torch.save({"w": w, "rows": space.P.shape[0], "start": space.start,
                    "stop": space.stop, "gram": space.P.T @ space.P},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(fn, args, nprocs, deadline_s=300):
    """mp.spawn (the 'spawn' start method: fresh interpreters, nothing inherited from the
    pytest process but its environment), joined with a deadline: a hung rank fails the test
    instead of hanging CI; the children are killed on the way out."""
    context = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + deadline_s
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the {nprocs} ranks did not finish in {deadline_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


def test_sharded_twa_on_two_gloo_processes_matches_single_process(tmp_path):
    _spawn(_worker, (str(tmp_path / "store"), str(tmp_path)), WORLD)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert [(r["start"], r["stop"], r["rows"]) for r in results] == [(0, 29, 29), (29, 57, 29)]
    # The shards' columns are orthonormal together: the Grams of the row blocks sum to I.
    torch.testing.assert_close(results[0]["gram"] + results[1]["gram"],
                               torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-13)
    model, ckpts, x, y = _setup()
    w_single, _ = _run(model, sub.build_subspace(ckpts, dtype=torch.float64), x, y)
    for r in results:  # every rank holds the whole, identical weight vector
        torch.testing.assert_close(r["w"], w_single, rtol=1e-12, atol=1e-12)
