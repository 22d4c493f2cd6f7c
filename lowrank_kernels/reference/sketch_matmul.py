import torch

from .sketch_omega import sketch_omega as reference_sketch_omega

_BLOCK_ELEMENTS = 1 << 20  # entries of Ω materialized at a time


def sketch_matmul(M: torch.Tensor, k: int, seed: int = 0, rademacher: bool = False,
                  transpose: bool = False, row_offset: int = 0) -> torch.Tensor:
    """Y = M Ω (m × k; Ω_ij = f(seed, row_offset + i, j), i < n) or, transpose=True,
    Y = Ωᵀ M (k × n; i < m), with Ω materialized in row blocks of ≤ 2²⁰ entries by the
    PyTorch Philox (reference.sketch_omega) and multiplied with torch.mm. float64 M gives
    float64 Y; anything else is computed and returned in float32."""
    dtype = torch.float64 if M.dtype == torch.float64 else torch.float32
    inner = M.shape[0] if transpose else M.shape[1]
    out = M.shape[1] if transpose else M.shape[0]
    block = max(1, _BLOCK_ELEMENTS // max(k, 1))
    Y = None
    for r0 in range(0, inner, block):
        nb = min(block, inner - r0)
        rows = torch.arange(row_offset + r0, row_offset + r0 + nb, device=M.device)
        Om = reference_sketch_omega(rows, k, seed, rademacher, 0).to(dtype)  # nb × k
        A, B = (Om.T, M[r0:r0 + nb].to(dtype)) if transpose else (M[:, r0:r0 + nb].to(dtype), Om)
        Y = A @ B if Y is None else Y.addmm_(A, B)  # one block: no accumulator
    if Y is None:  # inner dimension 0
        Y = torch.zeros((k, out) if transpose else (out, k), device=M.device, dtype=dtype)
    return Y
