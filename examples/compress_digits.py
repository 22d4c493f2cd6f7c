"""Low-rank compression of a small CNN on scikit-learn's digits: train it, replace its Conv2d
and Linear layers by randomized-SVD factors (rank by effective rank, by 90% energy, and a
fixed rank 16), report parameters and FLOPs saved and the test accuracy before compression,
right after, and after a short fine-tuning of the factors.

    python examples/compress_digits.py [--out examples/results]

Writes compress_digits.md and compress_digits.json (needs scikit-learn for the data).
"""
import argparse
import copy
import json
import os

import torch

from lowrank_kernels.compress import compress
from train_digits import load_digits as digits_split  # the one digits loader

TRAIN_STEPS, FINETUNE_STEPS = 600, 150


def load_digits():
    """((X_train, y_train), (X_test, y_test)): images (N, 1, 8, 8), the examples' 80/20 split."""
    x_train, y_train, x_test, y_test = digits_split()
    return (x_train, y_train), (x_test, y_test)


def build_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(64 * 4 * 4, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 10))


def train(model, data, steps, lr, seed=1):
    X, y = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (128,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
    return model


@torch.no_grad()
def accuracy(model, data):
    X, y = data
    model.eval()
    return float((model(X).argmax(1) == y).float().mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (the models are tiny: one thread is fastest)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    train_data, test_data = load_digits()
    trained = train(build_model(), train_data, TRAIN_STEPS, 1e-3)
    base_accuracy = accuracy(trained, test_data)
    print(f"trained: test accuracy {base_accuracy:.4f}")
    summary = {"setup": dict(model="Conv(1→32) Conv(32→64) MaxPool Linear(1024→256) "
                                   "Linear(256→10), ReLU", data="sklearn digits, 80/20 split",
                             train=f"Adam lr 1e-3, {TRAIN_STEPS} steps of batch 128",
                             finetune=f"Adam lr 3e-4, {FINETUNE_STEPS} steps of batch 128",
                             torch=torch.__version__),
               "accuracy_uncompressed": base_accuracy, "rules": {}}
    lines = ["# Low-rank compression on digits", "",
             f"Trained CNN: test accuracy **{base_accuracy:.4f}**. Each rule replaces the "
             "Conv2d/Linear layers by two thin factors from a randomized SVD "
             "(`lowrank_kernels.compress.compress`); a layer whose factors would not save "
             "parameters is kept. FLOPs are per sample (2 × multiply-adds of the compressed "
             "layers).", ""]
    for label, rule in [("effective rank", dict(effective_rank=True)),
                        ("energy 0.90", dict(energy=0.90)), ("rank 16", dict(rank=16))]:
        model = copy.deepcopy(trained)
        _, report = compress(model, example_input=test_data[0][:4], **rule)
        after = accuracy(model, test_data)
        tuned = accuracy(train(model, train_data, FINETUNE_STEPS, 3e-4), test_data)
        print(f"{label}: params {report.params_before} → {report.params_after}, "
              f"FLOPs {report.flops_before:.0f} → {report.flops_after:.0f}, accuracy "
              f"{after:.4f} → {tuned:.4f} after fine-tuning")
        summary["rules"][label] = dict(
            params_before=report.params_before, params_after=report.params_after,
            flops_before=report.flops_before, flops_after=report.flops_after,
            accuracy_after_compression=after, accuracy_after_finetuning=tuned,
            layers=[dict(name=l.name, shape=l.shape, rank=l.rank, full_rank=l.full_rank,
                         relative_error=round(l.relative_error, 5)) for l in report.layers])
        lines += [f"## Rule: {label}", "", report.to_markdown(), "",
                  f"Test accuracy: {base_accuracy:.4f} before → **{after:.4f}** right after "
                  f"compression → **{tuned:.4f}** after fine-tuning ({FINETUNE_STEPS} steps).",
                  ""]
    with open(os.path.join(args.out, "compress_digits.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(args.out, "compress_digits.json"), "w") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
