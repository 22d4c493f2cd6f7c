"""Train a small CNN and an MLP on scikit-learn's digits (1797 real 8×8 images, 10 classes) with
SGD, AdamW, KFAC, FNGD and SENG; write a plot of loss and accuracy against steps and wall
time (optimizers_digits.png), a markdown table (optimizers_digits.md) and the histories
(optimizers_digits.json) to examples/results/.

    python examples/train_digits.py              # about a few minutes on 2 CPU cores
    python examples/train_digits.py --epochs 3 --models mlp --optimizers sgd fngd
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_kernels.optim import FNGD, KFAC, SENG

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = 64


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **values):
        pass

    def close(self):
        pass


def progress_bar(total, desc, enabled):
    """A tqdm progress bar (tqdm is imported only when one is shown)."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def load_digits(device="cpu", dtype=torch.float32):
    """(x_train, y_train, x_test, y_test): pixels / 16 as (N, 1, 8, 8), a fixed 80/20 split."""
    from sklearn.datasets import load_digits as sklearn_digits
    data = sklearn_digits()
    x = torch.tensor(data.images, dtype=dtype)[:, None] / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order].to(device), y[order].to(device)
    n_train = int(0.8 * len(y))
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def make_model(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    if kind == "cnn":
        return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(32 * 2 * 2, 10))
    raise ValueError(f"model must be 'mlp' or 'cnn', got {kind!r}")


def make_optimizer(name, model, steps_per_epoch):
    """The settings used for the committed results, picked from a short sweep of (lr, damping)
    on 3-4 epochs, the same for both models. SENG refreshes its curvature every step here: on
    this small problem a kept curvature (update_freq > 1) preconditions the next batches'
    gradients, most of which lie outside the old batch's span and get the full 1/λ, which
    made training unstable at these learning rates."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    if name == "kfac":
        return KFAC(model, lr=0.02, damping=0.1, momentum=0.9, inverse_every=5)
    if name == "fngd":
        return FNGD(model, lr=0.05, damping=0.5, momentum=0.9, steps_per_epoch=steps_per_epoch)
    if name == "seng":
        return SENG(model, lr=0.1, damping=1.0, momentum=0.9, update_freq=1)
    raise ValueError(f"optimizer must be one of sgd, adamw, kfac, fngd, seng; got {name!r}")


@torch.no_grad()
def evaluate(model, x, y):
    out = model(x)
    return F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


def train(model_kind, opt_name, epochs, data, seed=0, progress=True):
    """One run: a history of per-step train loss and wall time, and per-epoch test metrics."""
    x_train, y_train, x_test, y_test = data
    model = make_model(model_kind, seed)
    steps_per_epoch = (len(y_train) + BATCH - 1) // BATCH
    opt = make_optimizer(opt_name, model, steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    history = {"step": [], "loss": [], "time": [], "cpu_time": [], "eval_step": [],
               "eval_time": [], "test_loss": [], "test_acc": []}
    elapsed, cpu, step = 0.0, 0.0, 0
    bar = progress_bar(epochs * steps_per_epoch, f"{model_kind}/{opt_name}", progress)
    for _ in range(epochs):
        order = torch.randperm(len(y_train), generator=g)
        for k in range(steps_per_epoch):
            idx = order[k * BATCH:(k + 1) * BATCH]
            start, cpu_start = time.perf_counter(), time.process_time()
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()
            elapsed += time.perf_counter() - start
            cpu += time.process_time() - cpu_start
            step += 1
            history["step"].append(step)
            history["loss"].append(loss.item())
            history["time"].append(elapsed)
            history["cpu_time"].append(cpu)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        test_loss, test_acc = evaluate(model, x_test, y_test)
        for key, value in [("eval_step", step), ("eval_time", elapsed),
                           ("test_loss", test_loss), ("test_acc", test_acc)]:
            history[key].append(value)
    bar.close()
    if hasattr(opt, "close"):
        history["fallbacks"] = int(opt.state["fallbacks"])
        opt.close()
    return history


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({m for m, _ in results})
    fig, axes = plt.subplots(len(models), 4, figsize=(18, 4 * len(models)), squeeze=False)
    for row, model_kind in enumerate(models):
        for (m, name), h in results.items():
            if m != model_kind:
                continue
            ax = axes[row]
            ax[0].plot(h["step"], smooth(h["loss"]), label=name)
            ax[1].plot(h["time"], smooth(h["loss"]), label=name)
            ax[2].plot(h["eval_step"], h["test_acc"], marker=".", label=name)
            ax[3].plot(h["eval_time"], h["test_acc"], marker=".", label=name)
        titles = ["train loss vs step", "train loss vs wall time (s)",
                  "test accuracy vs step", "test accuracy vs wall time (s)"]
        for ax, title in zip(axes[row], titles):
            ax.set_title(f"{model_kind}: {title}")
            ax.grid(alpha=0.3)
        axes[row][0].set_yscale("log")
        axes[row][1].set_yscale("log")
        axes[row][2].set_ylim(0.8, 1.0)
        axes[row][3].set_ylim(0.8, 1.0)
        axes[row][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def smooth(values, width=10):
    out, acc = [], 0.0
    for k, v in enumerate(values):
        acc += v
        if k >= width:
            acc -= values[k - width]
        out.append(acc / min(k + 1, width))
    return out


def table(results, epochs):
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"Digits (sklearn), batch {BATCH}, {epochs} epochs, CPU ({os.cpu_count()} cores, "
             f"load average {load:.1f} at the end), torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads. Wall time counts training steps only; CPU "
             "time (process time of those steps) is the steadier number on a shared machine.",
             "", "| model | optimizer | final test acc | best test acc | train wall (s) | "
             "train CPU (s) | CPU ms / step | fallbacks |", "|---|---|---|---|---|---|---|---|"]
    for (m, name), h in results.items():
        steps = h["step"][-1]
        lines.append(f"| {m} | {name} | {h['test_acc'][-1]:.4f} | {max(h['test_acc']):.4f} | "
                     f"{h['time'][-1]:.1f} | {h['cpu_time'][-1]:.1f} | "
                     f"{1000 * h['cpu_time'][-1] / steps:.1f} | "
                     f"{h.get('fallbacks', '—')} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--optimizers", nargs="+",
                        default=["sgd", "adamw", "kfac", "fngd", "seng"])
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (the models are tiny; 1 avoids OpenMP "
                        "oversubscription on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    data = load_digits()
    results = {}
    for model_kind in args.models:
        for name in args.optimizers:
            results[(model_kind, name)] = train(model_kind, name, args.epochs, data)
            h = results[(model_kind, name)]
            print(f"{model_kind:4s} {name:6s} test acc {h['test_acc'][-1]:.4f} "
                  f"wall {h['time'][-1]:.1f}s CPU {h['cpu_time'][-1]:.1f}s")
    plot(results, os.path.join(args.out, "optimizers_digits.png"))
    with open(os.path.join(args.out, "optimizers_digits.md"), "w") as f:
        f.write(table(results, args.epochs))
    with open(os.path.join(args.out, "optimizers_digits.json"), "w") as f:
        json.dump({f"{m}/{n}": {k: [round(v, 5) if isinstance(v, float) else v for v in vs]
                                if isinstance(vs, list) else vs for k, vs in h.items()}
                   for (m, n), h in results.items()}, f)
    print(table(results, args.epochs))


if __name__ == "__main__":
    main()
