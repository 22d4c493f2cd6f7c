"""lowrank_kernels::woodbury_solve — the batched damped solve of sample-space natural gradient:

    X = (K + λ'I)⁻¹ R,   λ' = λ, or λ + (jitter·s)·10^p (s = mean_i |K_ii|) when K + λI is not
                         numerically positive definite,

per batch member (a layer's Gram K = UᵀU, a damping λ, several right-hand sides R). Only the
lower triangle of K (K[i, k], k ≤ i) is read. Returns X, a LAPACK-like int32 `info` per member
and the damping actually used.
"""
from typing import NamedTuple

import torch

from .. import _checks
from .._registry import Backend, OpSpec, on_backend, register
from ..reference import woodbury_solve as ref

OP = "woodbury_solve"
INFO_NONFINITE = ref.INFO_NONFINITE
INFO_OVERFLOW = ref.INFO_OVERFLOW
INFO_BAD_DAMPING = ref.INFO_BAD_DAMPING
_DTYPES = (torch.float32, torch.float64)
_INF = float("inf")


class WoodburySolveResult(NamedTuple):
    X: torch.Tensor
    info: torch.Tensor
    damping_used: torch.Tensor


_R_SHAPES_BATCHED = "b x n x r or b x n: the right-hand sides"
_R_SHAPES = "n x r or n: the right-hand sides"


def check(K, damping, R, jitter, max_tries):
    if type(K) is torch.Tensor and type(R) is torch.Tensor and type(damping) is torch.Tensor and \
            K.dtype is R.dtype and K.dtype in _DTYPES and damping.dtype in _checks.FLOAT_DTYPES \
            and K.device == R.device and (jitter is None or 0.0 <= jitter < _INF) and \
            0 <= max_tries <= 64:
        k, r, d = K.shape, R.shape, damping.shape
        b = len(k) - 2  # 1: a batch of matrices
        if (b == 0 or b == 1) and k[-1] == k[-2] and b + 1 <= len(r) <= b + 2 and \
                r[b] == k[-1] and (b == 0 or r[0] == k[0]) and (
                    not d and (damping.is_cpu or damping.device == K.device) or
                    len(d) == 1 and d[0] == (k[0] if b else 1) and damping.device == K.device):
            return K  # the common case in one expression; errors come from the checks below
    _checks.check_tensor(OP, "K", K, (2, 3), "b x n x n or n x n: the symmetric matrices")
    _checks.check_float(OP, "K", K, _DTYPES)
    if K.shape[-1] != K.shape[-2]:
        raise ValueError(f"{OP}: K must be square in its last two dims, got shape "
                         f"{tuple(K.shape)}")
    batched = K.dim() == 3
    _checks.check_tensor(OP, "R", R, (3, 2) if batched else (2, 1),
                         _R_SHAPES_BATCHED if batched else _R_SHAPES)
    _checks.check_float(OP, "R", R, _DTYPES)
    _checks.check_same(OP, ("K", "R"), (K, R), "device")
    _checks.check_same(OP, ("K", "R"), (K, R), "dtype")
    if batched:
        _checks.check_dim_match(OP, "K", K.shape[0], "R", R.shape[0], "batch size b (dim 0)")
    rows = R.shape[1] if batched else R.shape[0]
    _checks.check_dim_match(OP, "K", K.shape[-1], "R", rows, "size n (K's last dim, R's rows)")
    _checks.check_tensor(OP, "damping", damping, (0, 1), "a float, 0-d or (b,) tensor")
    _checks.check_float(OP, "damping", damping)
    if not (damping.dim() == 0 and damping.is_cpu):  # a CPU scalar goes with any device
        _checks.check_same(OP, ("K", "damping"), (K, damping), "device")
    if damping.dim() == 1 and damping.shape[0] != (K.shape[0] if batched else 1):
        raise ValueError(f"{OP}: damping must have one value per batch member "
                         f"({K.shape[0] if batched else 1}), got shape {tuple(damping.shape)}")
    if jitter is not None and not (0.0 <= jitter < float("inf")):
        raise ValueError(f"{OP}: jitter must be finite and >= 0, got {jitter}")
    if not 0 <= max_tries <= 64:
        raise ValueError(f"{OP}: max_tries must be in [0, 64], got {max_tries}")
    return K


def fake(K, damping, R, jitter, max_tries):
    stats = (K.shape[0],) if K.dim() == 3 else ()
    return (R.new_empty(R.shape), K.new_empty(stats, dtype=torch.int32), K.new_empty(stats))


def _reference(K, damping, R, jitter, max_tries):
    return ref.woodbury_solve(K, damping, R, jitter, max_tries)


SPEC = register(OpSpec(
    name=OP,
    schema="(Tensor K, Tensor damping, Tensor R, float? jitter=None, int max_tries=4"
           ") -> (Tensor, Tensor, Tensor)",
    check=check,
    fake=fake,
    backends={
        "reference": Backend(_reference, {"cpu": _DTYPES, "cuda": _DTYPES}),
        "native": Backend(None,  # the C++/CUDA kernel: the op itself
                          {"cpu": _DTYPES, "cuda": _DTYPES}),
    },
    auto={"cpu": ("native",), "cuda": ("native",)},
))
_OP = torch.ops.lowrank_kernels.woodbury_solve.default


def woodbury_solve(K: torch.Tensor, damping, R: torch.Tensor, *, jitter: float | None = None,
                   max_tries: int = ref.DEFAULT_MAX_TRIES, backend: str | None = None):
    """Batched damped solve X = (K + λ'I)⁻¹ R by Cholesky, reading only the lower triangle of K.

    K: (b, n, n) or (n, n), float32 or float64, symmetric; only K[..., i, k] with k ≤ i is read
       (the upper triangle may hold anything, NaN included).
    damping: λ ≥ 0, a float, a 0-d tensor or a (b,) tensor (one per member) on K's device (a 0-d
       CPU tensor goes with any device). A float is checked here; a tensor's values are checked
       on the device, without a host sync: a member whose λ is negative, NaN or Inf gets
       info = -3 (INFO_BAD_DAMPING) and X = 0.
    R: (b, n, r) or (b, n) for a batched K, (n, r) or (n,) otherwise; same dtype and device as K.
    jitter, max_tries: the jitter ladder for members whose K + λI is not numerically positive
       definite: λ_p = λ + (jitter·s)·10^p for p = 0, …, max_tries − 1, s = mean_i |K_ii| (1 when
       that is 0), tried in turn until the Cholesky factorization succeeds; only failing members
       are retried (with the native backend every member is independent arithmetic, bit-for-bit
       what it would be alone). jitter defaults to 1e-6 (float32) / 1e-12 (float64), max_tries
       to 4; jitter=0 or max_tries=0 turns it off.
    backend: None (native), or force 'reference' (torch.linalg.cholesky_ex + torch.cholesky_solve) or
       'native': on GPU one fused kernel per call, a thread block per member (damping, blocked
       Cholesky, both triangular solves and the ladder; the factor in shared memory up to
       n = 320 in float32 / 224 in float64 on sm_90, beyond that in a b·n²/2-element workspace);
       on CPU in C++, in parallel over members: LAPACK (potrf + two trsm) per member from n = 32
       (faster there), the same per-member schedule below that and for the jitter ladder.

    Returns WoodburySolveResult(X, info, damping_used), a named tuple:
      X: R's shape and dtype. Never NaN: it is zero for every member whose info ≠ 0.
      info: int32, shape (b,) (or () for a 2-D K), LAPACK/cuSOLVER-like:
        0   solved, with damping_used (= λ unless the ladder was needed);
        k   (1 ≤ k ≤ n) not solved: the leading minor of order k of K + damping_used·I is not
            positive definite (damping_used is the last rung tried);
        -1  (INFO_NONFINITE) the lower triangle of K or R has NaN/Inf; damping_used = λ;
        -2  (INFO_OVERFLOW) factored, but the solution overflowed the dtype;
        -3  (INFO_BAD_DAMPING) the damping is negative, NaN or Inf.
      damping_used: K's dtype, info's shape: the λ' that X solves with.
    Cost per member: n³/3 + 2n²r flops. Bad arguments raise errors naming the argument.
    """
    if not isinstance(damping, torch.Tensor):
        if isinstance(damping, bool) or not isinstance(damping, (int, float)):
            raise TypeError(f"{OP}: damping must be a float or a tensor, got "
                            f"{type(damping).__name__}")
        if not 0.0 <= damping < float("inf"):
            raise ValueError(f"{OP}: damping must be finite and >= 0, got {damping}")
        if isinstance(K, torch.Tensor) and K.dtype == torch.float32 and damping > 3.4e38:
            raise ValueError(f"{OP}: damping {damping} overflows K's dtype float32")
        # A CPU scalar (on the CPU whatever torch.set_default_device says): filled on K's
        # device by the kernel, no host-device copy.
        damping = torch.scalar_tensor(float(damping), dtype=torch.float64, device="cpu")
    return WoodburySolveResult(*on_backend(_OP, backend)(K, damping, R, jitter, max_tries))
