"""Subspace kernels: the stored-basis projections c = Pᵀ g and w = base + P α (TWA, dense
random subspace), TWA's projected step, the Fastfood and on-the-fly random projections of
intrinsic-dimension training, and the fast Walsh–Hadamard transform — ours (lowrank_kernels,
backend auto) against torch.matmul with a stored P (what a projection without a kernel
stores), the same TWA step in plain PyTorch, and FWHT by butterflies / a Hadamard GEMM.
bytes_moved is the floor of each: the bytes the computation must read and write once."""
import torch
from common import DEVICE, FULL, Case, Setup, baseline, ours

import lowrank_kernels as lk
import lowrank_kernels.subspace as sub
from lowrank_kernels.optim import TWA

# (D, k): ResNet-18 / ResNet-50-sized models with 16–64 checkpoints.
TWA_SHAPES = [(11_200_000, 16), (11_200_000, 64), (25_600_000, 32)] if FULL else [
    (300_001, 16)]
# (D, d): random subspaces.
RANDOM_SHAPES = [(11_200_000, 1_000), (11_200_000, 10_000), (1_000_000, 4_096)] if FULL else [
    (65_537, 256)]
STORED_P_LIMIT = 8e9 if DEVICE == "cuda" else 1e9  # bytes of a dense fp32 P we agree to store
FWHT_SIZES = [1024, 16384]


def _vectors(D, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = torch.linalg.qr(torch.randn(D, k, generator=g))[0].to(DEVICE) if D * k < 5e7 else \
        (torch.randn(D, k, generator=g) / D ** 0.5).to(DEVICE)
    return (P, torch.randn(D, generator=g).to(DEVICE), torch.randn(k, generator=g).to(DEVICE))


def _project(D, k):
    def build():
        P, g, _ = _vectors(D, k)
        return Setup([ours("", lambda: lk.subspace_project(P, g)),
                      baseline("torch Pᵀ @ g", lambda: P.T @ g)],
                     flops=2.0 * D * k, bytes_moved=4.0 * (D * k + D + k))
    return build


def _expand(D, k):
    def build():
        P, base, a = _vectors(D, k)
        return Setup([ours("", lambda: lk.subspace_expand(P, a, base)),
                      baseline("torch.addmv", lambda: torch.addmv(base, P, a))],
                     flops=2.0 * D * k, bytes_moved=4.0 * (D * k + 2 * D + k))
    return build


def _twa_step(D, k):
    def build():
        P, g, _ = _vectors(D, k)
        mine = [torch.nn.Parameter(torch.zeros(D, device=DEVICE))]
        mine[0].grad = g
        space = sub.Subspace(P=P, mean_alpha=torch.zeros(k, device=DEVICE), D=D)
        opt = TWA(mine, space, lr=0.1, momentum=0.9)

        theirs = [torch.nn.Parameter(torch.zeros(D, device=DEVICE))]
        theirs[0].grad = g
        alpha, buf = torch.zeros(k, device=DEVICE), torch.zeros(k, device=DEVICE)
        flat_grad = torch.empty(D, device=DEVICE)

        @torch.no_grad()
        def step():  # the same step in plain PyTorch (the TWA reference code's formulation)
            torch.cat([p.grad.reshape(-1) for p in theirs], out=flat_grad)
            buf.mul_(0.9).add_(P.T @ flat_grad)
            alpha.add_(buf, alpha=-0.1)
            theirs[0].copy_(P @ alpha)

        return Setup([ours("", opt.step), baseline("torch (matmul)", step, check=False)],
                     flops=4.0 * D * k, bytes_moved=4.0 * (2 * D * k + 3 * D))
    return build


def _random_projection(D, d):
    """θ = θ₀ + P d forward and Pᵀ ∇θ backward: Fastfood and on-the-fly P (ours, rows of
    their own) against a stored Gaussian P (what they replace; other random matrices, so the
    outputs are not compared)."""
    def build():
        coords = torch.randn(d, device=DEVICE, requires_grad=True)
        base = torch.randn(D, device=DEVICE)
        cotangent = torch.randn(D, device=DEVICE)

        def fwd_bwd(proj):
            def step():
                coords.grad = None
                proj(coords, base).backward(cotangent)
                return coords.grad
            return step

        providers = [ours(f"{kind} projection",
                          fwd_bwd(sub.make_projection(kind, D, d, device=DEVICE)))
                     for kind in ("fastfood", "onthefly")]
        notes = {}
        if 4.0 * D * d <= STORED_P_LIMIT:
            P = torch.randn(D, d, device=DEVICE) / D ** 0.5
            providers.append(baseline("torch.addmv, stored P",
                                      fwd_bwd(lambda c, b: torch.addmv(b, P, c)), check=False))
        else:
            notes["stored P"] = f"{4e-9 * D * d:.0f} GB: not stored"
        # The floor: vectors only (an on-the-fly P costs no bytes).
        return Setup(providers, bytes_moved=4.0 * 3 * D, notes=notes)
    return build


def _fwht_butterflies(x):
    """Unnormalized Sylvester-order FWHT along the last dimension, log₂ n stacked passes."""
    n = x.shape[-1]
    y, h = x.reshape(-1, n), 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return y.reshape(x.shape)


def _fwht(n):
    def build():
        rows = (1 << 24) // n if FULL else (1 << 16) // n
        x = torch.randn(rows, n, device=DEVICE)
        providers = [ours("", lambda: lk.fwht(x)),
                     baseline("torch butterflies", lambda: _fwht_butterflies(x))]
        if n <= 4096:  # a stored Hadamard matrix (n² floats) and one GEMM
            H = _fwht_butterflies(torch.eye(n, device=DEVICE))
            providers.append(baseline("torch x @ H (stored H)", lambda: x @ H))
        return Setup(providers, flops=float(rows * n * (n.bit_length() - 1)),
                     bytes_moved=8.0 * rows * n, tol=1e-5)
    return build


CASES = ([Case("subspace_project c = Pᵀg", f"D={D} k={k} fp32", _project(D, k))
          for D, k in TWA_SHAPES]
         + [Case("subspace_expand w = base + Pα", f"D={D} k={k} fp32", _expand(D, k))
            for D, k in TWA_SHAPES]
         + [Case("TWA step (momentum)", f"D={D} k={k} fp32", _twa_step(D, k))
            for D, k in TWA_SHAPES]
         + [Case("random projection fwd+bwd", f"D={D} d={d} fp32", _random_projection(D, d))
            for D, d in RANDOM_SHAPES]
         + [Case("fwht", f"{(1 << 24) // n if FULL else (1 << 16) // n}×{n} fp32", _fwht(n))
            for n in FWHT_SIZES])
