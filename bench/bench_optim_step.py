"""Training-step time (forward + backward + optimizer step + zero_grad) of SGD, AdamW, KFAC,
FNGD (first epoch: Gram + solve + weighted sum; after: the reused coefficients applied in
the backward itself, Capture.weighted — no Gram, no solve, no weighted sum; per layer and
with blocks="model") and SENG (refresh step; step between refreshes) on a
ResNet-18-for-CIFAR-shaped model (B = 128, 3×32×32, train-mode BatchNorm), the same with
GroupNorm for BatchNorm and a GPT-2-small-shaped model (B = 8, T = 512), in one run. Without
a GPU (and without LOWRANK_BENCH_FULL=1) the models are reduced (widths, depth, batch,
image / sequence size; the shape label says which). Targets: FNGD after its first epoch
≤ 1.15× SGD, FNGD first epoch ≥ 2× faster than KFAC, SENG ≤ 2× SGD.

    python bench/run.py -k optim
"""
import torch
import torch.nn.functional as F
from common import DEVICE, FULL, Case, Provider, Setup, baseline
from torch import nn

from lowrank_kernels.optim import FNGD, KFAC, SENG

# ---- models -------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = norm(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          norm(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for CIFAR (3×3 stem, no max-pool), widths w, 2w, 4w, 8w (w = 64 full);
    norm(channels): nn.BatchNorm2d, or GroupNorm (8 groups)."""

    def __init__(self, width=64, classes=10, norm=nn.BatchNorm2d):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False),
                                  norm(width), nn.ReLU())
        blocks, c = [], width
        for k, stride in enumerate([1, 2, 2, 2]):
            c_out = width * 2 ** k
            blocks += [BasicBlock(c, c_out, stride, norm), BasicBlock(c_out, c_out, 1, norm)]
            c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, d // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """GPT-2-shaped decoder (full: vocab 50257, d 768, 12 layers, 12 heads), tied head."""

    def __init__(self, vocab, d, layers, heads, context):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx):
        positions = torch.arange(idx.shape[1], device=idx.device).expand_as(idx)
        x = self.tok(idx) + self.pos(positions)  # (B, T): the capture needs the batch dim
        return self.head(self.ln(self.blocks(x)))


def _resnet_case(groupnorm=False):
    if FULL:
        width, B, size = 64, 128, 32
    else:
        width, B, size = 16, 32, 16
    norm = (lambda c: nn.GroupNorm(8, c)) if groupnorm else nn.BatchNorm2d
    torch.manual_seed(0)
    model = ResNet18(width, norm=norm).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, size, size, generator=g).to(DEVICE)
    y = torch.randint(0, 10, (B,), generator=g).to(DEVICE)
    return model, (lambda: F.cross_entropy(model(x), y)), "mean"


def _gpt_case():
    if FULL:
        vocab, d, layers, heads, B, T = 50257, 768, 12, 12, 8, 512
    else:
        vocab, d, layers, heads, B, T = 2048, 128, 2, 4, 4, 64
    torch.manual_seed(0)
    model = GPT(vocab, d, layers, heads, T).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, vocab, (B, T + 1), generator=g).to(DEVICE)

    def loss():
        logits = model(idx[:, :-1])
        return F.cross_entropy(logits.reshape(-1, vocab), idx[:, 1:].reshape(-1))

    return model, loss, 1.0 / (B * T)  # token mean: loss = (1/(B·T)) Σ_i ℓ_i


CASES_BY_MODEL = {"resnet18": _resnet_case, "resnet18-groupnorm": lambda: _resnet_case(True),
                  "gpt2": _gpt_case}
LABELS = {"resnet18": "ResNet-18 BatchNorm CIFAR B=128 3x32x32",
          "resnet18-groupnorm": "ResNet-18 GroupNorm CIFAR B=128 3x32x32",
          "gpt2": "GPT-2 small B=8 T=512"} if FULL else {
    "resnet18": "ResNet-18 BatchNorm REDUCED width 16 B=32 3x16x16",
    "resnet18-groupnorm": "ResNet-18 GroupNorm REDUCED width 16 B=32 3x16x16",
    "gpt2": "GPT-2 REDUCED vocab 2048 d 128 2 layers B=4 T=64"}

# ---- optimizers: (name, constructor, steps to run before timing) ---------------------------
HUGE = 10 ** 9
OPTIMIZERS = {
    "sgd": (lambda m, r: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9), 0),
    "adamw": (lambda m, r: torch.optim.AdamW(m.parameters(), lr=1e-4), 0),
    "kfac (factors + inverses)": (lambda m, r: KFAC(m, lr=1e-3, inverse_every=1,
                                                    loss_reduction=r), 0),
    "kfac (factors only)": (lambda m, r: KFAC(m, lr=1e-3, inverse_every=HUGE,
                                              loss_reduction=r), 1),
    "fngd (first epoch)": (lambda m, r: FNGD(m, lr=1e-3, steps_per_epoch=HUGE,
                                             loss_reduction=r), 0),
    "fngd (after first epoch)": (lambda m, r: FNGD(m, lr=1e-3, steps_per_epoch=1,
                                                   loss_reduction=r), 1),
    "fngd (after first epoch, blocks=model)": (lambda m, r: FNGD(
        m, lr=1e-3, steps_per_epoch=1, blocks="model", loss_reduction=r), 1),
    # damping 1 (not SENG's default 1e-2): between refreshes the kept curvature amplifies the
    # part of each new gradient outside the refresh batch's span by 1/λ (x10 more with the
    # momentum), and with 1e-2 the GPT case (loss 87 at its N(0, 1) tied head) diverged
    # within 10 timed steps: every later step was skipped (NaN), not timed
    "seng (refresh)": (lambda m, r: SENG(m, lr=1e-3, damping=1.0, update_freq=1,
                                         loss_reduction=r), 0),
    "seng (between refreshes)": (lambda m, r: SENG(m, lr=1e-3, damping=1.0, update_freq=HUGE,
                                                   loss_reduction=r), 1),
}


BASELINES = ("sgd", "adamw")


def _case(name):
    def build():
        runs = {}
        for opt_name, (make, warm_steps) in OPTIMIZERS.items():
            model, loss_fn, reduction = CASES_BY_MODEL[name]()  # a model per optimizer
            opt = make(model, reduction)

            def step(loss_fn=loss_fn, opt=opt):
                loss = loss_fn()
                loss.backward()
                opt.step()
                opt.zero_grad()
                return loss

            for _ in range(warm_steps):
                step()
            if isinstance(opt, FNGD):  # the phase the row names is the phase it times
                assert opt.computing() == (opt_name == "fngd (first epoch)")
            runs[opt_name] = (opt, step)

        def after():
            failed = []
            for opt_name, (opt, _) in runs.items():
                if hasattr(opt, "close"):
                    fallbacks, skipped = int(opt.state["fallbacks"]), int(opt.state["skipped"])
                    if fallbacks or skipped:
                        failed.append(f"{opt_name}: {fallbacks} fallbacks, {skipped} skipped")
                    # every timed FNGD reuse step went through the weighted backward
                    if isinstance(opt, FNGD) and opt.state["weighted_sum_steps"]:
                        failed.append(f"{opt_name}: {opt.state['weighted_sum_steps']} "
                                      "weighted-sum steps")
                    opt.close()
            assert not failed, "; ".join(failed)

        return Setup([baseline(n, step, check=False) if n in BASELINES else
                      Provider(n, step, role="ours") for n, (_, step) in runs.items()],
                     after=after)
    return build


# The ops run on their default path (no per-call non-finite check, no host sync): the
# optimizers guard non-finite values themselves, on the device. On CPU, one torch thread (a worker
# of its own): on a shared machine two OpenMP threads spin against other processes and a step
# takes 10-30x longer (measured here). All optimizers of a model run interleaved, so the
# speed-up of each row is against SGD (or AdamW, the faster) in the same rounds.
CASES = [Case("optim_step", LABELS[name] + (", 1 thread" if DEVICE == "cpu" else ""),
              _case(name), threads=1 if DEVICE == "cpu" else None, budget_scale=6.0)
         for name in CASES_BY_MODEL]
