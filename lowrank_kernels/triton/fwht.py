"""Triton kernel of the fast Walsh–Hadamard transform y = H_n x along a fiber of n = 2^m
elements: one program per fiber, held in registers, log₂ n butterfly stages in fp32. A stage
views the fiber as (n/2h, 2, h): the pair sums are a sum over the middle axis, the pair
differences a signed sum, put back with a broadcast select (no shuffles). Transforms longer
than MAX_FIBER use H_{ab} = (H_a ⊗ I_b)(I_a ⊗ H_b): one launch per factor, the fiber then
strided."""
import torch
import triton
import triton.language as tl

MAX_FIBER = 8192


@triton.jit
def _fwht_kernel(x, y, inner, N: tl.constexpr, LOG_N: tl.constexpr):
    # Fiber p: elements base + t·inner, t < N, of a contiguous (outer, N, inner) view.
    pid = tl.program_id(0).to(tl.int64)
    base = (pid // inner) * N * inner + pid % inner
    offsets = base + tl.arange(0, N).to(tl.int64) * inner
    v = tl.load(x + offsets).to(tl.float32)
    half = tl.arange(0, 2)
    sign = tl.where(half == 0, 1.0, -1.0)
    for s in tl.static_range(LOG_N):  # stage s pairs elements 2^s apart
        pairs = tl.reshape(v, (N >> (s + 1), 2, 1 << s))
        total = tl.sum(pairs, axis=1)                              # a + b
        diff = tl.sum(pairs * sign[None, :, None], axis=1)         # a − b
        v = tl.reshape(tl.where(half[None, :, None] == 0, total[:, None, :], diff[:, None, :]),
                       (N,))
    tl.store(y + offsets, v)


def _factors(n):
    """n = 2^m as a product of the fewest powers of two ≤ MAX_FIBER, balanced (16384 =
    128 × 128, not 8192 × 2: no launch of millions of 2-point programs)."""
    log_n = n.bit_length() - 1
    parts = max(1, -(-log_n // (MAX_FIBER.bit_length() - 1)))
    logs = [log_n // parts + (i < log_n % parts) for i in range(parts)]
    return [1 << e for e in logs]


def fwht(x: torch.Tensor) -> torch.Tensor:
    """y = H_n x along the last dimension (n = 2^m), fp32 arithmetic, y in x's dtype."""
    n = x.shape[-1]
    y = x.contiguous().clone() if x.numel() else x.clone()
    if y.numel() == 0 or n == 1:
        return y
    rows = y.numel() // n
    inner = 1
    for m in reversed(_factors(n)):  # innermost factor first: contiguous fibers
        _fwht_kernel[(rows * (n // m),)](y, y, inner, N=m, LOG_N=m.bit_length() - 1,
                                         num_warps=8 if m >= 2048 else 4)
        inner *= m
    return y
