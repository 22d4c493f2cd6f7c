"""Randomized range finder (Halko, Martinsson & Tropp 2011, Alg. 4.4): an orthonormal basis of
the dominant range of a matrix or operator, from a sketch Y = M Ω with Ω generated inside
the kernel from a counter-based RNG (never stored for a dense M)."""
import dataclasses
import math
from typing import Callable

import torch

import lowrank_kernels as _lk

from .orthonormalize import METHODS, OrthoInfo, _nonfinite, _orthonormalize

OP = "range_finder"
DISTS = ("gaussian", "rademacher")


@dataclasses.dataclass(frozen=True)
class LinearOperator:
    """A matrix M (shape m × n) known through its products: matmul(X) = M X for X n × l and
    rmatmul(Y) = Mᵀ Y for Y m × l (rmatmul may be left out for a symmetric M, then matmul is
    used). dtype and device are those of the products (and of the X, Y passed in)."""
    shape: tuple
    matmul: Callable
    rmatmul: Callable | None = None
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"

    def __post_init__(self):
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise ValueError(f"LinearOperator: shape must be (m, n) with m, n >= 1, got "
                             f"{self.shape}")
        if not callable(self.matmul):
            raise TypeError("LinearOperator: matmul must be callable (X -> M X)")
        if self.rmatmul is None and self.shape[0] != self.shape[1]:
            raise ValueError("LinearOperator: rmatmul (Y -> Mᵀ Y) is required for a "
                             "non-square M")

    @property
    def T(self):
        """Mᵀ as an operator."""
        return LinearOperator((self.shape[1], self.shape[0]), self.rmatmul or self.matmul,
                              self.matmul, self.dtype, self.device)


@dataclasses.dataclass
class SketchStats:
    """What a randomized routine did: one OrthoInfo per orthonormalization (1 + 2·power_iters
    for range_finder), and how many of them fell back to Householder QR."""
    sketch_size: int = 0
    orthonormalizations: list = dataclasses.field(default_factory=list)

    @property
    def fallbacks(self) -> int:
        return sum(info.fallback for info in self.orthonormalizations)


def check_matrix(op, M, name="M"):
    """(m, n, dtype, device) of a dense M or a LinearOperator; errors name the argument."""
    if isinstance(M, LinearOperator):
        return M.shape[0], M.shape[1], M.dtype, torch.device(M.device)
    if not isinstance(M, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor or a LinearOperator, got "
                        f"{type(M).__name__}")
    shape, dtype = M.shape, M.dtype
    if len(shape) != 2:
        raise ValueError(f"{op}: {name} must be a 2-D tensor (m x n), got shape "
                         f"{tuple(shape)}")
    if dtype is not torch.float32 and dtype is not torch.float64:
        raise TypeError(f"{op}: {name} must be float32 or float64, got {dtype}")
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"{op}: {name} must be non-empty, got shape {tuple(shape)}")
    return shape[0], shape[1], dtype, M.device


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def check_options(op, k, oversample, power_iters, dist, seed, ortho):
    if type(k) is int and type(oversample) is int and type(power_iters) is int and \
            type(seed) is int and k >= 1 and oversample >= 0 and power_iters >= 0 and \
            0 <= seed < 2 ** 63 and dist in DISTS and (ortho == "auto" or ortho in METHODS):
        return  # the common case in one expression; the errors come from the checks below
    if not _is_int(k) or k < 1:
        raise ValueError(f"{op}: k must be a positive int, got {k!r}")
    if not _is_int(oversample) or oversample < 0:
        raise ValueError(f"{op}: oversample must be an int >= 0, got {oversample!r}")
    if not _is_int(power_iters) or power_iters < 0:
        raise ValueError(f"{op}: power_iters must be an int >= 0, got {power_iters!r}")
    if dist not in DISTS:
        raise ValueError(f"{op}: dist must be 'gaussian' or 'rademacher', got {dist!r}")
    if not _is_int(seed) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"{op}: seed must be an int in [0, 2**63), got {seed!r}")
    if ortho != "auto" and ortho not in METHODS:
        raise ValueError(f"{op}: ortho must be one of {('auto',) + METHODS}, got {ortho!r}")


def resolve_ortho(ortho, device):
    """'auto': Householder QR (LAPACK geqrf + orgqr) on a CPU, where it is faster than
    Cholesky-QR2 at sketch sizes (measured, MKL, 1 thread: m = 384-1024, l = 26-74);
    Cholesky-QR2 (GEMMs) elsewhere."""
    if ortho != "auto":
        return ortho
    if not isinstance(device, torch.device):
        device = torch.device(device)
    return "householder" if device.type == "cpu" else "cholqr2"


def _dense_products(M, cpu):
    """(X -> M X, Y -> Mᵀ Y) for a dense M. On a CPU the products are formed as the transposes
    (Xᵀ Mᵀ)ᵀ and (Yᵀ M)ᵀ: BLAS runs the GEMM with the wide l × m output 1.2-1.8× faster than
    the tall m × l one (measured, MKL, l = 26-74), and the result is column-major, the layout
    LAPACK's QR takes without a transposing copy."""
    if cpu:
        return (lambda X: (X.mT @ M.mT).mT), (lambda Y: (Y.mT @ M).mT)
    return M.__matmul__, (lambda Y: M.mT @ Y)


def dense_operator(M):
    """A dense M as a LinearOperator (its products: _dense_products)."""
    return LinearOperator(tuple(M.shape), *_dense_products(M, M.device.type == "cpu"), M.dtype,
                          M.device)


def _orth(Y, ortho, stats, op=OP, name="Y"):
    """orth(Y), recorded in stats; a non-finite Y raises NonFiniteError naming `name`."""
    Q, info = _orthonormalize(Y, ortho, False, True, 0.5, op, name)
    stats.orthonormalizations.append(info)
    return Q


def _power_basis(Y, stats, name):
    """A basis of range(Y) between power iterations, on a CPU with ortho='auto': one
    Cholesky-QR pass, Q = Y R⁻¹ with RᵀR = YᵀY (a third of Householder's cost there). Only
    range(Q) = range(Y) matters here (the last basis is Householder's), and it holds for any
    nonsingular R; the pass is trusted while κ(Y)² u ≤ 1/100, by the estimate
    max|R_ii| / min|R_ii| ≤ κ(R) = κ(Y), else (or when the Cholesky breaks down) Householder
    QR is taken. The decision reads R's diagonal once (one copy, not nine small ops). A NaN or
    Inf in Y puts one in the diagonal of YᵀY, so the Cholesky fails or R_ii is not finite:
    Householder is taken, whose check raises NonFiniteError naming `name`. Recorded as method
    'cholqr' (one pass)."""
    R, status = torch.linalg.cholesky_ex(Y.mT @ Y, upper=True)
    d = [abs(x) for x in R.diagonal().tolist()]
    if not status and all(0 < x < math.inf for x in d) and \
            (max(d) / min(d)) ** 2 * torch.finfo(Y.dtype).eps <= 0.01:
        stats.orthonormalizations.append(OrthoInfo(method="cholqr"))
        return torch.linalg.solve_triangular(R, Y, upper=True, left=False)
    return _orth(Y, "householder", stats, name=name)


def _operator_sketch(matmul, n, device, l, seed, dist, block_cols, dtype, backend):
    """Y = M Ω from X -> M X (M with n columns): Ω (n × l) is materialized, block_cols columns
    at a time (one block, no concatenation, when block_cols >= l)."""
    rows = torch.arange(n, device=device)
    if block_cols >= l:
        return matmul(_lk.sketch_omega(rows, l, seed, dist, backend=backend).to(dtype)).to(dtype)
    blocks = [matmul(_lk.sketch_omega(rows, min(block_cols, l - c0), seed, dist, c0,
                                      backend=backend).to(dtype))
              for c0 in range(0, l, block_cols)]
    return torch.cat(blocks, dim=1).to(dtype)


def _operator_columns(M: LinearOperator, block_cols, dtype):
    """M itself (m × n) from an operator: M I, block_cols columns of I at a time."""
    n = M.shape[1]
    eye = torch.eye(n, dtype=dtype, device=M.device)
    return torch.cat([M.matmul(eye[:, c0:c0 + block_cols]) for c0 in range(0, n, block_cols)],
                     dim=1).to(dtype)


def _check_dense_finite(op, M):
    if not bool(torch.isfinite(M).all()):
        raise _nonfinite(op, "M")


def _exact_basis(M, m, n, dtype, device, ortho, block_cols, stats):
    """k + oversample ≥ min(m, n): the whole range is asked for, and a random sketch of
    min(m, n) columns can miss part of it (a Rademacher Ω is singular with positive
    probability), so the basis is exact instead: I_m when m ≤ n (range(M) ⊆ ℝ^m), else
    orth(M) (n ≤ m columns, range(M) ⊆ range(Q) even when M is rank deficient)."""
    dense = not isinstance(M, LinearOperator)
    if m <= n:
        if dense:
            _check_dense_finite(OP, M)
        return torch.eye(m, dtype=dtype, device=device)
    if dense:
        return _orth(M.to(dtype), ortho, stats, name="M")
    return _orth(_operator_columns(M, block_cols or n, dtype), ortho, stats,
                 name="M.matmul(I) (the operator's columns)")


def range_finder(M, k: int, *, oversample: int = 10, power_iters: int = 0,
                 dist: str = "gaussian", seed: int = 0, ortho: str = "auto",
                 block_cols: int | None = None, backend: str | None = None,
                 return_stats: bool = False):
    """Q (m × l, orthonormal columns, l = min(k + oversample, m, n)) with range(Q) ≈ the
    dominant l-dimensional range of M:

        Y = M Ω,  Q = orth(Y);   power_iters times:  Q = orth(M orth(Mᵀ Q))

    Ω (n × l) has entries Ω_ij = f(seed, i, j) (see lowrank_kernels.sketch_omega: Philox4x32-10
    + Box–Muller, or Rademacher ±1), the same on every device and backend. Halko–Martinsson–
    Tropp (Thm 10.6, power_iters=0, p = oversample ≥ 2):
        E‖M − QQᵀM‖ ≤ (1 + √(k/(p−1))) σ_{k+1} + e√(k+p)/p · (Σ_{j>k} σ_j²)^½,
    and each power iteration raises the singular values to the (2q+1)-th power in that bound.

    M: a dense float32/float64 matrix (any strides) — Y = M Ω by lowrank_kernels.sketch_matmul,
    Ω generated inside the GEMM (Triton) or in row blocks (native/reference), never n × l in
    memory; on a CPU as the wide product Y = (Ωᵀ Mᵀ)ᵀ, sketch_matmul(Mᵀ, transpose=True)
    (see _dense_products; 7-18% faster than Ω by sketch_omega then the same GEMM, the same
    bits); or a LinearOperator (callbacks M X and Mᵀ Y) — a callback needs Ω as a tensor, so
    Ω is materialized in column blocks of block_cols columns (default all l: n × l memory),
    one matmul call per block (block_cols is for operators only). Power iterations use M's
    products (torch.matmul for a dense M).
    ortho: 'cholqr2' (Cholesky-QR2, Householder fallback when it breaks down),
    'householder', or 'auto' (the faster there: on a CPU Householder for the returned basis
    and one Cholesky-QR pass between power iterations, see _power_basis; Cholesky-QR2
    elsewhere). backend: the sketch_matmul (dense) or sketch_omega (operator) backend.
    When k + oversample ≥ min(m, n) the whole range is asked for: Q is then exact, with no
    sketch and no power iteration (I_m when m ≤ n, else orth(M) from M's n columns), since
    a min(m, n)-column random sketch can miss part of the range.
    Non-finite input raises lowrank_kernels.NonFiniteError (a ValueError) naming M, or the
    operator callback (M.matmul / M.rmatmul) whose result was not finite; never a NaN Q.
    Returns Q, or (Q, SketchStats) with return_stats (stats.fallbacks counts the Householder
    fallbacks taken)."""
    m, n, dtype, device = check_matrix(OP, M)
    check_options(OP, k, oversample, power_iters, dist, seed, ortho)
    l = min(k + oversample, m, n)
    if block_cols is not None and (not _is_int(block_cols) or block_cols < 4
                                   or block_cols % 4):
        raise ValueError(f"{OP}: block_cols must be a positive multiple of 4, got "
                         f"{block_cols!r}")
    if not isinstance(return_stats, bool):
        raise TypeError(f"{OP}: return_stats must be a bool, got {return_stats!r}")
    stats = SketchStats(sketch_size=l)
    cpu = device.type == "cpu"
    power_basis = ortho == "auto" and cpu
    ortho = resolve_ortho(ortho, device)

    def orth(Y, name, last):
        if power_basis and not last:
            return _power_basis(Y, stats, name)
        return _orth(Y, ortho, stats, name=name)

    if k + oversample >= min(m, n):
        Q = _exact_basis(M, m, n, dtype, device, ortho, block_cols, stats)
        return (Q, stats) if return_stats else Q
    if isinstance(M, LinearOperator):
        matmul, rmatmul = M.matmul, M.rmatmul or M.matmul
        Y = _operator_sketch(matmul, n, device, l, seed, dist, block_cols or l, dtype, backend)
        Q = orth(Y, "M.matmul(Ω) (the sketch)", power_iters == 0)
        names = ("M.rmatmul(Q)" if M.rmatmul is not None else "M.matmul(Q)", "M.matmul(Z)")
    else:
        matmul, rmatmul = _dense_products(M, cpu)
        if cpu:  # Y = (Ωᵀ Mᵀ)ᵀ: the wide GEMM, column-major Y (see _dense_products)
            Y = _lk.sketch_matmul(M.mT, l, seed, dist, transpose=True, backend=backend).mT
        else:
            Y = _lk.sketch_matmul(M, l, seed, dist, backend=backend)
        try:
            Q = orth(Y, "the sketch M Ω (overflow: rescale M)", power_iters == 0)
        except ValueError:
            _check_dense_finite(OP, M)  # names M when M has NaN/Inf
            raise
        names = ("Mᵀ Q", "M Z")
    for i in range(power_iters):
        Z = orth(rmatmul(Q), names[0], False)
        Q = orth(matmul(Z), names[1], i == power_iters - 1)
    return (Q, stats) if return_stats else Q
