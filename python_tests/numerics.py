"""Error bounds for tests: a priori bounds of floating-point dot products (Higham, §3.1).

A dot product of length n accumulated in a format with unit roundoff u satisfies
|fl(x·y) − x·y| ≤ γ_n |x|·|y|, γ_n = n u / (1 − n u). A kernel that is right passes them at
any shape; a kernel that drops or doubles a term fails them.
"""
import torch

U32 = 2.0 ** -24  # unit roundoff of float32 (the accumulator of every fused kernel)
U64 = 2.0 ** -53  # unit roundoff of float64


def gamma(n, u=U32):
    return n * u / (1 - n * u)


def assert_within(actual, exact, bound, what=""):
    """|actual − exact| ≤ bound elementwise (all float64), with the worst offender reported."""
    err = (actual.double() - exact).abs()
    excess = err - bound
    worst = int(torch.argmax(excess)) if excess.numel() else 0
    assert excess.numel() == 0 or float(excess.flatten()[worst]) <= 0.0, (
        f"{what}: error {float(err.flatten()[worst]):.3e} exceeds the bound "
        f"{float(bound.flatten()[worst]):.3e} at flat index {worst}")
