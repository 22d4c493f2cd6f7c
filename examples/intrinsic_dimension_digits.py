"""Intrinsic dimension of an MLP on scikit-learn's digits (Li et al., ICLR 2018): train the
64-100-100-10 MLP in random subspaces θ = θ₀ + P d of growing d (dense and Fastfood P) and
report d_int90, the smallest d reaching 90% of the full model's test accuracy.

    python examples/intrinsic_dimension_digits.py [--out examples/results]

Writes intrinsic_dimension_digits.png and intrinsic_dimension_digits.json (needs
scikit-learn for the data and matplotlib for the figure). About a minute on 2 CPU cores.
"""
import argparse
import json
import os
import time

import torch

import lowrank_kernels.subspace as sub
from train_digits import load_digits as digits_split  # the one digits loader

DIMS = [5, 10, 20, 50, 100, 200, 300, 500, 750, 1000, 1500, 2000]
STEPS = 400


def load_digits():
    """((X_train, y_train), (X_test, y_test)): flat pixels (N, 64), the examples' 80/20 split."""
    x_train, y_train, x_test, y_test = digits_split()
    return (x_train.flatten(1), y_train), (x_test.flatten(1), y_test)


def build_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 100), torch.nn.ReLU(),
                               torch.nn.Linear(100, 100), torch.nn.ReLU(),
                               torch.nn.Linear(100, 10))


def make_trainer(train, test):
    (Xtr, ytr), (Xte, yte) = train, test

    def train_and_evaluate(model, params):
        full = not isinstance(model, sub.SubspaceModel)
        opt = torch.optim.Adam(params, lr=3e-3 if full else 3e-2)
        g = torch.Generator().manual_seed(1)
        for _ in range(STEPS):
            idx = torch.randint(0, len(ytr), (256,), generator=g)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
            opt.step()
        with torch.no_grad():
            return float((model(Xte).argmax(1) == yte).float().mean())

    return train_and_evaluate


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (the models are tiny: one thread is fastest)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    train, test = load_digits()
    trainer = make_trainer(train, test)
    results, summary = [], {}
    for projection in ("dense", "fastfood"):
        start = time.perf_counter()
        result = sub.intrinsic_dimension(build_model, trainer, DIMS, projection=projection)
        seconds = time.perf_counter() - start
        results.append(result)
        summary[projection] = dict(d_int90=result.d_int, dims=result.dims,
                                   accuracies=[round(a, 4) for a in result.accuracies],
                                   full_accuracy=round(result.full_accuracy, 4),
                                   num_parameters=result.num_parameters,
                                   seconds=round(seconds, 1))
        print(f"{projection:9s} full {result.full_accuracy:.4f}  d_int90 = {result.d_int}  "
              f"({seconds:.0f} s)")
        for d, a in zip(result.dims, result.accuracies):
            print(f"    d = {d:5d}: {a:.4f}")
    png = os.path.join(args.out, "intrinsic_dimension_digits.png")
    sub.plot_intrinsic_dimension(results, png, "digits, MLP 64-100-100-10: intrinsic dimension")
    summary["setup"] = dict(model="MLP 64-100-100-10 (ReLU)", data="sklearn digits, 80/20 split",
                            optimizer=f"Adam, {STEPS} steps of batch 256 (lr 3e-3 full, 3e-2 "
                                      "subspace)", threshold=0.9, torch=torch.__version__)
    with open(os.path.join(args.out, "intrinsic_dimension_digits.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("wrote", png)


if __name__ == "__main__":
    main()
