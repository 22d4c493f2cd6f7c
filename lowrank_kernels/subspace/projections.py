"""Random projections P (D×d) for random-subspace training θ = θ₀ + P d. Each is a module
whose forward(coords, base) returns base + P·coords with autograd to coords (Pᵀ ∇θ):

    DenseProjection     P stored (D×d), Gaussian with unit columns (subspace_expand op)
    SparseProjection    P stored sparse (COO), ±1 entries with density ρ (default 1/√D, the
                        "very sparse" projection of Li, Hastie & Church), unit columns;
                        O(ρ D d) memory
    FastfoodProjection  P = [V₁; …; V_m] / √m truncated to D rows (m = ⌈D/n⌉ blocks),
                        V_j = H G_j Π_j H B_j / (‖G_j‖√n), n = 2^⌈log₂ d⌉, H the Walsh–Hadamard
                        matrix (fwht op), B_j random signs, Π_j a random permutation, G_j
                        Gaussian: O(D) memory, O(D log n) work; each V_j has unit columns, so P
                        has unit columns before the truncation
    OnTheFlyProjection  P = Ω/√D with Ω_ij = f(seed, i, j) generated inside the kernels
                        (random_subspace_expand / _project ops): no memory for P, D·d work
"""
import math

import torch

import lowrank_kernels as _lk

from . import _args

DISTS = ("gaussian", "rademacher")


def _check(op, D, d, seed, dtype=torch.float32):
    _args.positive_int(op, "D", D)
    _args.positive_int(op, "d", d)
    _args.seed(op, seed)
    _args.float_dtype(op, "dtype", dtype)


def _generator(seed, device):
    return torch.Generator(device=device).manual_seed(seed)


class DenseProjection(torch.nn.Module):
    """Stored Gaussian P (D×d) with unit columns."""

    def __init__(self, D, d, seed=0, dtype=torch.float32, device=None, backend=None):
        super().__init__()
        _check("DenseProjection", D, d, seed, dtype)
        P = torch.randn(D, d, generator=_generator(seed, "cpu"), dtype=torch.float64)
        P /= P.norm(dim=0, keepdim=True)
        self.register_buffer("P", P.to(device=device, dtype=dtype))
        self.backend = backend

    def forward(self, coords, base):
        return _lk.subspace_expand(self.P, coords, base, backend=self.backend)


class SparseProjection(torch.nn.Module):
    """Stored sparse P (COO): each column has ⌈ρD⌉ entries ±1 at random rows (drawn with
    replacement; a repeated row sums its signs), then scaled to unit norm."""

    def __init__(self, D, d, seed=0, density=None, dtype=torch.float32, device=None):
        super().__init__()
        _check("SparseProjection", D, d, seed, dtype)
        density = 1.0 / math.sqrt(D) if density is None else density
        density = _args.real_in("SparseProjection", "density", density, 0, 1)
        per_col = max(1, math.ceil(density * D))
        g = _generator(seed, "cpu")
        rows = torch.randint(0, D, (d, per_col), generator=g)
        cols = torch.arange(d)[:, None].expand(d, per_col)
        signs = torch.randint(0, 2, (d, per_col), generator=g, dtype=torch.float64) * 2 - 1
        P = torch.sparse_coo_tensor(torch.stack([rows.reshape(-1), cols.reshape(-1)]),
                                    signs.reshape(-1), (D, d), check_invariants=True).coalesce()
        index, values = P.indices(), P.values()
        norms = torch.zeros(d, dtype=torch.float64).index_add_(0, index[1], values ** 2).sqrt()
        values = values / norms.clamp_min(1e-300)[index[1]]  # a column of cancelled signs: 0
        P = torch.sparse_coo_tensor(index, values, (D, d), is_coalesced=True,
                                    check_invariants=True)
        self.register_buffer("P", P.to(device=device, dtype=dtype))

    def forward(self, coords, base):
        return base + torch.sparse.mm(self.P, coords.to(self.P.dtype)[:, None])[:, 0]


class FastfoodProjection(torch.nn.Module):
    """Fastfood P = [V₁; …; V_m]/√m, V_j = H G_j Π_j H B_j / (‖G_j‖√n), first D rows."""

    def __init__(self, D, d, seed=0, dtype=torch.float32, device=None, backend=None):
        super().__init__()
        _check("FastfoodProjection", D, d, seed, dtype)
        n = 1 << max(d - 1, 0).bit_length()
        blocks = -(-D // n)
        g = _generator(seed, "cpu")
        signs = torch.randint(0, 2, (blocks, n), generator=g).to(dtype) * 2 - 1
        perm = torch.argsort(torch.rand(blocks, n, generator=g), dim=1)
        gauss = torch.randn(blocks, n, generator=g, dtype=torch.float64)
        scale = 1.0 / (gauss.norm(dim=1, keepdim=True) * math.sqrt(n * blocks))
        for name, t in (("signs", signs), ("perm", perm), ("gauss", gauss.to(dtype)),
                        ("scale", scale.to(dtype))):
            self.register_buffer(name, t.to(device))
        self.D, self.d, self.n, self.backend = D, d, n, backend

    def forward(self, coords, base):
        x = torch.nn.functional.pad(coords.to(self.signs.dtype), (0, self.n - self.d))
        x = _lk.fwht(self.signs * x, backend=self.backend)                  # H B_j x
        x = torch.gather(x, 1, self.perm) * self.gauss                   # G_j Π_j
        x = _lk.fwht(x, backend=self.backend) * self.scale                   # H … / (‖G_j‖√n)
        return base + x.reshape(-1)[: self.D].to(base.dtype)


class OnTheFlyProjection(torch.nn.Module):
    """P = Ω/√D generated from (seed, i, j) inside the kernels; nothing stored."""

    def __init__(self, D, d, seed=0, dist="gaussian", backend=None):
        super().__init__()
        _check("OnTheFlyProjection", D, d, seed)
        if dist not in DISTS:
            raise ValueError(f"OnTheFlyProjection: dist must be 'gaussian' or 'rademacher', "
                             f"got {dist!r}")
        self.D, self.d, self.seed, self.dist, self.backend = D, d, seed, dist, backend
        self.scale = 1.0 / math.sqrt(max(D, 1))

    def forward(self, coords, base):
        return _lk.random_subspace_expand(coords, self.seed, self.D, self.scale, self.dist, base,
                                      backend=self.backend)


PROJECTIONS = {"dense": DenseProjection, "sparse": SparseProjection,
               "fastfood": FastfoodProjection, "onthefly": OnTheFlyProjection}


def make_projection(kind, D, d, seed=0, dtype=torch.float32, device=None, **kwargs):
    """The projection `kind` ('dense', 'sparse', 'fastfood' or 'onthefly') for D×d."""
    if not isinstance(kind, str) or kind not in PROJECTIONS:
        names = ", ".join(map(repr, PROJECTIONS))
        raise ValueError(f"make_projection: projection must be one of {names}, "
                         f"got {kind!r}")
    if kind == "onthefly":
        return OnTheFlyProjection(D, d, seed, **kwargs)
    return PROJECTIONS[kind](D, d, seed, dtype=dtype, device=device, **kwargs)
