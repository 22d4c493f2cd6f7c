"""Helpers shared by the CPU kernels: the accumulation dtype, token views, one triangle of a
symmetric Gram and its mirror."""
import functools

import torch

# Rows of a block of a symmetric Gram's upper triangle computed by one GEMM (measured on a
# 2-core AVX2 CPU: 64-row block GEMMs keep ~90% of the full GEMM's rate at B ≥ 128).
TRIANGLE_BLOCK = 64
# Below this many rows the full GEMM is faster than block rows of the triangle.
TRIANGLE_MIN_ROWS = 128


def acc_dtype(*tensors):
    """float64 when an input is float64, else float32 (the accumulation dtype)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) \
        else torch.float32


def as_tokens(X, groups=1):
    """(B, d) or (B, T, d) -> (B, T, groups, d / groups): the token rows split by group."""
    X = X if X.dim() == 3 else X[:, None]
    return X.unflatten(-1, (groups, X.shape[-1] // groups))


@functools.lru_cache(maxsize=64)
def _upper_mask(n, device):
    return torch.ones(n, n, dtype=torch.bool, device=device).triu_()


def mirror_upper(K):
    """K with its strict lower triangle replaced by the transposed upper one (exactly
    symmetric); the lower triangle of K may be uninitialized."""
    return torch.where(_upper_mask(K.shape[0], K.device), K, K.T)


def upper_row_blocks(n, block=None):
    """Row ranges [r0, r1) whose blocks K[r0:r1, r0:] cover the upper triangle of an n × n K:
    blocks of `block` rows (default: TRIANGLE_BLOCK, or the whole matrix in one block below
    TRIANGLE_MIN_ROWS rows)."""
    if block is None:
        block = TRIANGLE_BLOCK if n >= TRIANGLE_MIN_ROWS else max(n, 1)
    return [(r0, min(r0 + block, n)) for r0 in range(0, n, block)]
