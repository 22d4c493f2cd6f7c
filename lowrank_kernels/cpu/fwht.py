"""CPU fwht: y = H_n x along the last dimension by log₂ n radix-2 butterfly stages, each stage two
in-place-free elementwise kernels (a + b, a − b) written straight into a ping-pong buffer — no
stack and no per-stage allocation (the reference allocates three arrays per stage)."""
import torch


def fwht(x: torch.Tensor) -> torch.Tensor:
    """y = H_n x along the last dimension (n a power of two), H_n the unnormalized Sylvester
    Hadamard matrix; log₂ n butterfly stages (a, b) → (a + b, a − b), the same sums in the same
    order as lowrank_kernels.reference.fwht. Computed in float32 (float64 for float64),
    returned in x's dtype."""
    n = x.shape[-1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    src = x.to(dtype).reshape(-1, n)
    if n == 1 or src.shape[0] == 0:  # H_1 = 1
        return x.clone(memory_format=torch.contiguous_format)
    buffers = [torch.empty_like(src, memory_format=torch.contiguous_format), None]
    h, level = 1, 0
    while h < n:
        dst = buffers[level % 2]
        pairs, out = src.view(-1, n // (2 * h), 2, h), dst.view(-1, n // (2 * h), 2, h)
        torch.add(pairs[:, :, 0], pairs[:, :, 1], out=out[:, :, 0])
        torch.sub(pairs[:, :, 0], pairs[:, :, 1], out=out[:, :, 1])
        if buffers[1] is None:  # the second buffer: the input's own copy when we own it
            buffers[1] = src if src.data_ptr() != x.data_ptr() else torch.empty_like(dst)
        src = dst
        h, level = 2 * h, level + 1
    return src.view(x.shape).to(x.dtype)
