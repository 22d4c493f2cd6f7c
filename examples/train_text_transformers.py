"""Train a small Hugging Face GPT-2, built from its config (random weights, no download), as a
character-level language model on real text that ships with Python itself: the source code of
a few standard-library modules (`inspect.getsource`). FNGD and SENG against AdamW (and KFAC);
writes the loss curves against steps and wall time (text_transformers.png), a markdown table
of the final train/validation loss and wall time per optimizer (text_transformers.md) and the
histories (text_transformers.json) to examples/results/.

    python examples/train_text_transformers.py                 # a few minutes on 2 CPU cores
    python examples/train_text_transformers.py --steps 50 --optimizers adamw fngd

The model returns a ModelOutput: the loss is computed here from `.logits` (next-character
cross-entropy, the mean over the batch's tokens). With a token mean over full-length
sequences, loss = (1/B) Σ_i ℓ_i with ℓ_i the mean over sample i's tokens, which is the
optimizers' default loss_reduction="mean".
"""
import argparse
import inspect
import json
import os
import time

import torch
import torch.nn.functional as F

from lowrank_kernels.optim import FNGD, KFAC, SENG
from train_digits import progress_bar, smooth  # the examples' one progress bar and smoother

HERE = os.path.dirname(os.path.abspath(__file__))
# standard-library modules whose source is the corpus (pure Python, present on every CPython)
TRAIN_MODULES = ["textwrap", "string", "heapq", "bisect", "fnmatch", "shlex", "glob",
                 "colorsys", "calendar", "difflib"]
VALID_MODULES = ["queue", "sched"]
BLOCK = 64   # characters per sample (the model's context)
BATCH = 16


def load_corpus():
    """(train ids, validation ids, alphabet): the modules' source, one id per character; the
    alphabet is the training text's characters plus one id for characters it does not have."""
    import importlib

    def source(names):
        return "\n\n".join(inspect.getsource(importlib.import_module(n)) for n in names)

    train_text, valid_text = source(TRAIN_MODULES), source(VALID_MODULES)
    alphabet = sorted(set(train_text))
    index = {ch: k + 1 for k, ch in enumerate(alphabet)}  # 0: unknown character

    def encode(text):
        return torch.tensor([index.get(ch, 0) for ch in text], dtype=torch.int64)

    return encode(train_text), encode(valid_text), ["\0"] + alphabet


def make_model(vocab_size, seed=0):
    """GPT-2 with 2 layers, width 64, 4 heads, a context of BLOCK characters; no dropout (the
    runs are deterministic given the seed)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab_size, n_positions=BLOCK, n_layer=2, n_embd=64,
                                  n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def make_optimizer(name, model, steps_per_epoch):
    """Settings from a short sweep over 80 steps at this size: AdamW lr in {1e-3, 3e-3, 1e-2};
    FNGD and SENG lr in {0.05, 0.2, 0.5} x damping in {1, 0.1}; KFAC lr in {0.02, 0.05, 0.1}
    x damping in {1, 0.1}. Damping 1 was best for all three. SENG refreshes its curvature
    every step and sketches no layer at this size (all are below sketch_threshold), so in the
    first epoch (steps_per_epoch batches) it computes what FNGD computes; they differ once
    FNGD reuses its first-epoch coefficients."""
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    if name == "fngd":
        return FNGD(model, lr=0.05, damping=1.0, momentum=0.9, steps_per_epoch=steps_per_epoch)
    if name == "seng":
        return SENG(model, lr=0.05, damping=1.0, momentum=0.9, update_freq=1)
    if name == "kfac":
        return KFAC(model, lr=0.05, damping=1.0, momentum=0.9, inverse_every=5)
    raise ValueError(f"optimizer must be one of adamw, fngd, seng, kfac; got {name!r}")


def lm_loss(model, x, y):
    """Mean next-character cross-entropy over the B·T tokens, from the ModelOutput's logits."""
    logits = model(input_ids=x).logits  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def batches(ids, steps, seed):
    """`steps` batches (x, y) of BATCH random windows of BLOCK + 1 characters (y = x shifted)."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.arange(BLOCK + 1)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - BLOCK - 1, (BATCH,), generator=g)
        window = ids[starts[:, None] + offsets]
        yield window[:, :-1], window[:, 1:]


@torch.no_grad()
def evaluate(model, ids, n=32):
    """Mean loss on n fixed windows of the text, evenly spaced."""
    starts = torch.linspace(0, len(ids) - BLOCK - 2, n).long()
    window = ids[starts[:, None] + torch.arange(BLOCK + 1)]
    return lm_loss(model, window[:, :-1], window[:, 1:]).item()


def train(opt_name, steps, data, seed=0, eval_every=25, progress=True):
    """One run: per-step train loss and wall/CPU time of the training steps, and the
    validation loss every eval_every steps (its time is not counted)."""
    train_ids, valid_ids, alphabet = data
    model = make_model(len(alphabet), seed)
    steps_per_epoch = max(1, len(train_ids) // (BATCH * BLOCK))
    opt = make_optimizer(opt_name, model, steps_per_epoch)
    history = {"step": [], "loss": [], "time": [], "cpu_time": [], "eval_step": [0],
               "eval_time": [0.0], "valid_loss": [evaluate(model, valid_ids)]}
    elapsed, cpu = 0.0, 0.0
    bar = progress_bar(steps, opt_name, progress)
    for step, (x, y) in enumerate(batches(train_ids, steps, seed), 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = lm_loss(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        elapsed += time.perf_counter() - start
        cpu += time.process_time() - cpu_start
        for key, value in [("step", step), ("loss", loss.item()), ("time", elapsed),
                           ("cpu_time", cpu)]:
            history[key].append(value)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % eval_every == 0 or step == steps:
            for key, value in [("eval_step", step), ("eval_time", elapsed),
                               ("valid_loss", evaluate(model, valid_ids))]:
                history[key].append(value)
    bar.close()
    if hasattr(opt, "close"):
        history["fallbacks"] = int(opt.state["fallbacks"])
        opt.close()
    history["parameters"] = sum(p.numel() for p in model.parameters())
    return history


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, h in results.items():
        line, = axes[0].plot(h["step"], smooth(h["loss"]), label=name)
        axes[1].plot(h["time"], smooth(h["loss"]), color=line.get_color(), label=name)
        axes[2].plot(h["eval_time"], h["valid_loss"], marker=".", color=line.get_color(),
                     label=name)
    titles = ["train loss vs step (10-step mean)", "train loss vs wall time (s)",
              "validation loss vs wall time (s)"]
    for ax, title in zip(axes, titles):
        ax.set_title(f"GPT-2 char LM: {title}")
        ax.set_ylabel("cross-entropy (nats / char)")
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("wall time of the training steps (s)")
    axes[2].set_xlabel("wall time of the training steps (s)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(results, steps, data, total_wall):
    import transformers

    train_ids, valid_ids, alphabet = data
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    params = next(iter(results.values()))["parameters"]
    lines = [
        f"GPT-2 (transformers {transformers.__version__}, from its config: 2 layers, width 64, "
        f"4 heads, {params:,} parameters) as a character-level LM on the source of Python "
        f"{'.'.join(map(str, __import__('sys').version_info[:3]))}'s "
        f"{', '.join(TRAIN_MODULES)} ({len(train_ids):,} characters, {len(alphabet)} symbols); "
        f"validation: {', '.join(VALID_MODULES)} ({len(valid_ids):,} characters). Batch "
        f"{BATCH} × {BLOCK} characters, {steps} steps, seed 0, float32, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} cores "
        f"(load average {load:.1f} at the end). Wall time counts the training steps only; CPU "
        "time (process time of those steps) is the steadier number on a shared machine. "
        f"The whole script took {total_wall:.0f} s.",
        "", "| optimizer | first loss | final train loss (last 10 steps) | final validation "
        "loss | train wall (s) | train CPU (s) | CPU ms / step | fallbacks |",
        "|---|---|---|---|---|---|---|---|"]
    for name, h in results.items():
        n = h["step"][-1]
        last = sum(h["loss"][-10:]) / len(h["loss"][-10:])
        lines.append(f"| {name} | {h['loss'][0]:.3f} | {last:.3f} | {h['valid_loss'][-1]:.3f} | "
                     f"{h['time'][-1]:.1f} | {h['cpu_time'][-1]:.1f} | "
                     f"{1000 * h['cpu_time'][-1] / n:.0f} | {h.get('fallbacks', '—')} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "fngd", "seng", "kfac"])
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (the model is tiny; 1 avoids OpenMP "
                        "oversubscription on a shared machine)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    data = load_corpus()
    results = {}
    for name in args.optimizers:
        h = results[name] = train(name, args.steps, data, progress=not args.no_progress)
        print(f"{name:6s} train loss {h['loss'][0]:.3f} -> {sum(h['loss'][-10:]) / 10:.3f}, "
              f"validation {h['valid_loss'][-1]:.3f}, wall {h['time'][-1]:.1f}s "
              f"CPU {h['cpu_time'][-1]:.1f}s", flush=True)
    plot(results, os.path.join(args.out, "text_transformers.png"))
    text = table(results, args.steps, data, time.perf_counter() - started)
    with open(os.path.join(args.out, "text_transformers.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "text_transformers.json"), "w") as f:
        json.dump({n: {k: [round(v, 5) if isinstance(v, float) else v for v in vs]
                       if isinstance(vs, list) else vs for k, vs in h.items()}
                   for n, h in results.items()}, f)
    print(text)


if __name__ == "__main__":
    main()
