"""Subspace kernels: the stored-basis projections c = Pᵀ g and w = base + P α (TWA, dense
random subspace), the Fastfood and on-the-fly random projections of intrinsic-dimension
training, and TWA's projected step — ours against torch.matmul with a stored P (where it fits)
and against the same step in plain PyTorch. bytes_moved is the floor of each: the bytes the
computation must read and write once, so GB/s / peak bandwidth is the fraction of the floor."""
import pytest
import torch
from common import DEVICE, FULL, measure

import lowrank_kernels as lk
import lowrank_kernels.subspace as sub
from lowrank_kernels.optim import TWA

OURS = "triton" if DEVICE == "cuda" else "reference"
# (D, k): ResNet-18 / ResNet-50-sized models with 16–64 checkpoints.
TWA_SHAPES = [(11_200_000, 16), (11_200_000, 64), (25_600_000, 32)] if FULL else [
    (300_001, 16)]
# (D, d): random subspaces.
RANDOM_SHAPES = [(11_200_000, 1_000), (11_200_000, 10_000), (1_000_000, 4_096)] if FULL else [
    (65_537, 256)]
STORED_P_LIMIT = 8e9 if DEVICE == "cuda" else 1e9  # bytes of a dense fp32 P we agree to store


def _vectors(D, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = torch.linalg.qr(torch.randn(D, k, generator=g))[0].to(DEVICE) if D * k < 5e7 else \
        (torch.randn(D, k, generator=g) / D ** 0.5).to(DEVICE)
    return (P, torch.randn(D, generator=g).to(DEVICE), torch.randn(k, generator=g).to(DEVICE))


# ---- stored basis: Pᵀ g and base + P α ------------------------------------------------

@pytest.mark.parametrize("D,k", TWA_SHAPES)
@pytest.mark.parametrize("provider", ["ours", "torch"])
def test_subspace_project(benchmark, D, k, provider):
    P, g, _ = _vectors(D, k)
    fn = (lambda: lk.subspace_project(P, g, backend=OURS)) if provider == "ours" else \
        (lambda: P.T @ g)
    measure(benchmark, fn, op="subspace_project c = Pᵀg", shape=f"D={D} k={k} fp32",
            provider=f"ours ({OURS})" if provider == "ours" else "torch.matmul",
            flops=2.0 * D * k, bytes_moved=4.0 * (D * k + D + k), baseline=provider != "ours")


@pytest.mark.parametrize("D,k", TWA_SHAPES)
@pytest.mark.parametrize("provider", ["ours", "torch"])
def test_subspace_expand(benchmark, D, k, provider):
    P, base, a = _vectors(D, k)
    fn = (lambda: lk.subspace_expand(P, a, base, backend=OURS)) if provider == "ours" else \
        (lambda: torch.addmv(base, P, a))
    measure(benchmark, fn, op="subspace_expand w = base + Pα", shape=f"D={D} k={k} fp32",
            provider=f"ours ({OURS})" if provider == "ours" else "torch.addmv",
            flops=2.0 * D * k, bytes_moved=4.0 * (D * k + 2 * D + k),
            baseline=provider != "ours")


# ---- TWA: one projected step, ours against plain PyTorch --------------------------------

def _twa_case(D, k):
    P, g, _ = _vectors(D, k)
    params = [torch.nn.Parameter(torch.zeros(D, device=DEVICE))]
    params[0].grad = g
    space = sub.Subspace(P=P, mean_alpha=torch.zeros(k, device=DEVICE), D=D)
    return P, params, space


@pytest.mark.parametrize("D,k", TWA_SHAPES)
def test_twa_step_ours(benchmark, D, k):
    P, params, space = _twa_case(D, k)
    opt = TWA(params, space, lr=0.1, momentum=0.9, backend=OURS)
    measure(benchmark, opt.step, op="TWA step (momentum)", shape=f"D={D} k={k} fp32",
            provider=f"ours ({OURS})", flops=4.0 * D * k,
            bytes_moved=4.0 * (2 * D * k + 3 * D))


@pytest.mark.parametrize("D,k", TWA_SHAPES)
def test_twa_step_torch(benchmark, D, k):
    P, params, _ = _twa_case(D, k)
    alpha, buf = torch.zeros(k, device=DEVICE), torch.zeros(k, device=DEVICE)
    flat_grad = torch.empty(D, device=DEVICE)

    @torch.no_grad()
    def step():  # the same step in plain PyTorch (the TWA reference code's formulation)
        torch.cat([p.grad.reshape(-1) for p in params], out=flat_grad)
        buf.mul_(0.9).add_(P.T @ flat_grad)
        alpha.add_(buf, alpha=-0.1)
        params[0].copy_(P @ alpha)

    measure(benchmark, step, op="TWA step (momentum)", shape=f"D={D} k={k} fp32",
            provider="torch (matmul)", flops=4.0 * D * k, bytes_moved=4.0 * (2 * D * k + 3 * D),
            baseline=True)


# ---- random projections θ = θ₀ + P d (forward) and Pᵀ ∇θ (backward) ---------------------

@pytest.mark.parametrize("D,d", RANDOM_SHAPES)
@pytest.mark.parametrize("kind", ["fastfood", "onthefly", "stored"])
def test_random_projection_forward_backward(benchmark, D, d, kind):
    coords = torch.randn(d, device=DEVICE, requires_grad=True)
    base = torch.randn(D, device=DEVICE)
    cotangent = torch.randn(D, device=DEVICE)
    if kind == "stored":
        if 4.0 * D * d > STORED_P_LIMIT:
            pytest.skip(f"a stored P of {D}×{d} fp32 ({4e-9 * D * d:.0f} GB) does not fit")
        P = torch.randn(D, d, device=DEVICE) / D ** 0.5

        def proj(c, b):
            return torch.addmv(b, P, c)
        bytes_moved = 4.0 * (2 * D * d + 3 * D)  # P read twice (forward, backward)
        provider = "torch.matmul, stored P"
    else:
        proj = sub.make_projection(kind, D, d, device=DEVICE, backend=OURS)
        # The floor: vectors only (on-the-fly P costs no bytes); Fastfood reads B, Π, G.
        bytes_moved = 4.0 * 3 * D + (2 * 16.0 * D if kind == "fastfood" else 0.0)
        provider = f"ours {kind} ({OURS})"

    def step():
        coords.grad = None
        proj(coords, base).backward(cotangent)
        return coords.grad

    measure(benchmark, step, op="random projection fwd+bwd", shape=f"D={D} d={d} fp32",
            provider=provider, flops=4.0 * D * d if kind != "fastfood" else 0.0,
            bytes_moved=bytes_moved, baseline=kind == "stored")


@pytest.mark.parametrize("n", [1024, 16384])
@pytest.mark.parametrize("provider", ["ours", "reference"])
def test_fwht(benchmark, n, provider):
    rows = (1 << 24) // n if FULL else (1 << 16) // n
    x = torch.randn(rows, n, device=DEVICE)
    backend = OURS if provider == "ours" else "reference"
    if provider == "ours" and OURS == "reference":
        pytest.skip("no Triton fwht to time without a GPU (the interpreter is not a timing)")
    measure(benchmark, lambda: lk.fwht(x, backend=backend), op="fwht", shape=f"{rows}×{n} fp32",
            provider=f"ours ({backend})" if provider == "ours" else "torch butterflies",
            flops=float(rows * n * (n.bit_length() - 1)), bytes_moved=8.0 * rows * n,
            baseline=provider != "ours")
