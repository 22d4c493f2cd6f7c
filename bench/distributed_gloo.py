"""Data-parallel step cost on gloo (CPU): bytes communicated per rank and step time for FNGD
(first epoch: factors gathered + solve; reuse: U c from the weighted backward, carried by
DDP's own all-reduce), SENG (refresh: factors gathered;
between refreshes: DDP only; update_freq=1 with sketched layers: their sketches gathered, the
directions all-reduced in place of DDP's all-reduce), KFAC (factor sums all-reduced every
step; inverses spread over the ranks and broadcast every `inverse_every` steps) and DDP + SGD,
on the same MLP (64-256-256-10, float32, global batch 128 split over R ranks), R = 2 and 4.

    python bench/distributed_gloo.py            # writes bench/results/cpu-2core/distributed.{md,json}

Bytes: per rank and step, the optimizer's own collectives (all-reduce/broadcast: the buffer;
all-gather: its result) plus DDP's gradient buckets (counted by the comm hook). Time: median
over the measured steps of the slowest rank's forward + backward + step (wall clock; on a
shared 2-core machine 4 ranks oversubscribe the cores, so read the 4-rank times as relative).
"""
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python_tests"))

GLOBAL_BATCH, STEPS_PER_EPOCH, WARMUP = 128, 6, 1  # step 0 (warm-up) is not measured


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(),
                         nn.Linear(256, 10))


def _configs():
    from lowrank_kernels.optim import FNGD, KFAC, SENG
    spe = STEPS_PER_EPOCH
    return {
        # name: (factory, steps, {phase: predicate(step)})
        "DDP + SGD": (lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
                      spe, {"step": lambda s: True}),
        "FNGD": (lambda m: FNGD(m, lr=0.05, damping=0.5, steps_per_epoch=spe),
                 2 * spe, {"first epoch": lambda s: s < spe, "reuse": lambda s: s >= spe}),
        "FNGD blocks=model": (
            lambda m: FNGD(m, lr=0.05, damping=0.5, steps_per_epoch=spe, blocks="model"),
            2 * spe, {"first epoch": lambda s: s < spe, "reuse": lambda s: s >= spe}),
        "SENG": (lambda m: SENG(m, lr=0.05, damping=0.5, update_freq=3),
                 2 * spe, {"refresh": lambda s: s % 3 == 0, "between": lambda s: s % 3 != 0}),
        "SENG sketched": (lambda m: SENG(m, lr=0.05, damping=0.5, update_freq=3,
                                         sketch_threshold=10_000, sketch_size=32),
                          2 * spe, {"refresh": lambda s: s % 3 == 0,
                                    "between": lambda s: s % 3 != 0}),
        "SENG sketched, update_freq=1": (
            lambda m: SENG(m, lr=0.05, damping=0.5, sketch_threshold=10_000, sketch_size=32),
            spe, {"refresh": lambda s: True}),
        "KFAC": (lambda m: KFAC(m, lr=0.05, damping=1.0, inverse_every=4),
                 2 * spe, {"inverse step": lambda s: s % 4 == 0,
                           "other": lambda s: s % 4 != 0}),
    }


def _worker(rank, world, init_file, out):
    import gloo

    from lowrank_kernels.optim import _distributed
    with gloo.process_group(rank, world, init_file, timeout_s=300):
        b = GLOBAL_BATCH // world
        g = torch.Generator().manual_seed(1)
        data = [(torch.randn(GLOBAL_BATCH, 64, generator=g),
                 torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)) for _ in range(4)]
        rows = slice(rank * b, (rank + 1) * b)
        results = {}
        for name, (factory, steps, phases) in _configs().items():
            model = nn.parallel.DistributedDataParallel(_model())
            opt = factory(model)
            counter = getattr(opt, "data_parallel", None) or \
                _distributed.DataParallel(model, "exact", None)  # DDP + SGD: the hook only
            per_step = []
            for step in range(steps):
                x, y = data[step % len(data)]
                before = counter.counters()
                dist.barrier()
                start = time.perf_counter()
                opt.zero_grad()
                F.cross_entropy(model(x[rows]), y[rows]).backward()
                opt.step()
                elapsed = time.perf_counter() - start
                after = counter.counters()
                sent = after["bytes"] - before["bytes"] + after["ddp_bytes"] - before["ddp_bytes"]
                slowest = torch.tensor([elapsed])
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                per_step.append((float(slowest), sent))
            measured = list(enumerate(per_step))[WARMUP:]  # (step, (time, bytes))
            results[name] = {
                phase: {"ms": 1e3 * statistics.median(t for s, (t, _) in measured if pred(s)),
                        "bytes": max(n for s, (_, n) in measured if pred(s))}
                for phase, pred in phases.items()}
            if hasattr(opt, "close"):
                opt.close()
        if rank == 0:
            torch.save(results, out)


def run(world):
    from gloo import spawn
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pt")
        spawn(_worker, (world, os.path.join(tmp, "store"), out), world, deadline_s=900)
        return torch.load(out)


def main():
    params = sum(p.numel() for p in _model().parameters())
    table = {world: run(world) for world in (2, 4)}
    lines = [f"# Data-parallel step cost (gloo, CPU, {os.cpu_count()} cores)", "",
             f"MLP 64-256-256-10 ({params} parameters, float32: DDP's all-reduce is "
             f"{4 * params} bytes), global batch {GLOBAL_BATCH} over R ranks. Bytes: per rank "
             "and step, the optimizer's collectives + DDP's buckets; time: median over the "
             "steps of the slowest rank (torch threads = 1 per rank).", "",
             "| optimizer | phase | R | bytes / step | × DDP+SGD | ms / step |",
             "|---|---|---|---|---|---|"]
    for world, results in table.items():
        sgd = results["DDP + SGD"]["step"]["bytes"]
        for name, phases in results.items():
            for phase, r in phases.items():
                lines.append(f"| {name} | {phase} | {world} | {r['bytes']:,} | "
                             f"{r['bytes'] / sgd:.2f} | {r['ms']:.1f} |")
    for world, results in table.items():
        sgd = results["DDP + SGD"]["step"]["bytes"]
        for name in ("FNGD", "FNGD blocks=model"):
            assert results[name]["reuse"]["bytes"] <= sgd, (world, name, results[name])
    text = "\n".join(lines) + "\n"
    print(text)
    where = os.path.join(HERE, "results", "cpu-2core")
    os.makedirs(where, exist_ok=True)
    with open(os.path.join(where, "distributed.md"), "w") as f:
        f.write(text)
    with open(os.path.join(where, "distributed.json"), "w") as f:
        json.dump({str(k): v for k, v in table.items()}, f, indent=1)


if __name__ == "__main__":
    main()
