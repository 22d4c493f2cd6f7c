"""Data-parallel training on scikit-learn's digits with DistributedDataParallel: DDP + SGD,
FNGD (exact, and the opt-in local approximation), SENG and KFAC, the optimizers called exactly
as in examples/train_digits.py. Each rank takes its B/R rows of every global batch of B = 64
(the same shuffled order on every rank, incomplete last batch dropped so the ranks' batches
are equal); prints per rank the step time and the bytes it communicated per step, and rank 0
writes examples/results/train_digits_ddp.{md,json}.

    torchrun --nproc_per_node=2 examples/train_digits_ddp.py
    torchrun --nproc_per_node=4 examples/train_digits_ddp.py --epochs 2 --optimizers sgd fngd
"""
import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lowrank_kernels.optim import FNGD, KFAC, SENG
from lowrank_kernels.optim._distributed import DataParallel

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = 64


def load_digits():
    from sklearn.datasets import load_digits as sklearn_digits
    data = sklearn_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    n = int(0.8 * len(y))
    return x[:n], y[:n], x[n:], y[n:]


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 2 * 2, 10))


def make_optimizer(name, model, steps_per_epoch):
    """The settings of examples/train_digits.py."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if name in ("fngd", "fngd_local"):
        return FNGD(model, lr=0.05, damping=0.5, momentum=0.9, steps_per_epoch=steps_per_epoch,
                    distributed="local" if name == "fngd_local" else "auto")
    if name == "seng":
        return SENG(model, lr=0.1, damping=1.0, momentum=0.9, update_freq=1)
    if name == "kfac":
        return KFAC(model, lr=0.02, damping=0.1, momentum=0.9, inverse_every=5)
    raise ValueError(f"unknown optimizer {name!r}")


def train(name, epochs, data, rank, world):
    x_train, y_train, x_test, y_test = data
    model = nn.parallel.DistributedDataParallel(make_model())
    steps_per_epoch = len(y_train) // BATCH
    opt = make_optimizer(name, model, steps_per_epoch)
    counter = getattr(opt, "data_parallel", None) or DataParallel(model, "exact", None)
    b = BATCH // world
    g = torch.Generator().manual_seed(1)  # the same order on every rank
    times, sent = [], []
    for _ in range(epochs):
        order = torch.randperm(len(y_train), generator=g)
        for k in range(steps_per_epoch):
            idx = order[k * BATCH:(k + 1) * BATCH][rank * b:(rank + 1) * b]
            before = counter.counters()
            start = time.perf_counter()
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - start)
            after = counter.counters()
            sent.append(after["bytes"] - before["bytes"] + after["ddp_bytes"]
                        - before["ddp_bytes"])
    with torch.no_grad():
        out = model.module(x_test)
        acc = (out.argmax(1) == y_test).float().mean().item()
    if hasattr(opt, "close"):
        opt.close()
    first = steps_per_epoch
    return {"ms_per_step": 1e3 * sum(times) / len(times),
            "ms_first_epoch": 1e3 * sum(times[:first]) / first,
            "ms_later": 1e3 * sum(times[first:]) / max(1, len(times) - first),
            "bytes_first_epoch": sum(sent[:first]) / first,
            "bytes_later": sum(sent[first:]) / max(1, len(sent) - first),
            "test_acc": acc}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--optimizers", nargs="+",
                        default=["sgd", "fngd", "fngd_local", "seng", "kfac"])
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    data = load_digits()
    results = {}
    for name in args.optimizers:
        r = train(name, args.epochs, data, rank, world)
        results[name] = r
        print(f"[rank {rank}/{world}] {name:10s} {r['ms_first_epoch']:6.1f} ms/step (epoch 1) "
              f"{r['ms_later']:6.1f} ms/step (later)  {r['bytes_first_epoch'] / 1e3:8.1f} kB/step "
              f"(epoch 1) {r['bytes_later'] / 1e3:8.1f} kB/step (later)  "
              f"test acc {r['test_acc']:.3f}", flush=True)
    if rank == 0:
        lines = [f"# Digits CNN, DDP on {world} gloo processes (CPU), global batch {BATCH}, "
                 f"{args.epochs} epochs", "",
                 "| optimizer | ms/step epoch 1 | ms/step later | kB/step epoch 1 | "
                 "kB/step later | test acc |", "|---|---|---|---|---|---|"]
        for name, r in results.items():
            lines.append(f"| {name} | {r['ms_first_epoch']:.1f} | {r['ms_later']:.1f} | "
                         f"{r['bytes_first_epoch'] / 1e3:.1f} | {r['bytes_later'] / 1e3:.1f} | "
                         f"{r['test_acc']:.3f} |")
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        with open(os.path.join(HERE, "results", "train_digits_ddp.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(HERE, "results", "train_digits_ddp.json"), "w") as f:
            json.dump({"world": world, "epochs": args.epochs, "results": results}, f, indent=1)
        print("\n".join(lines))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
