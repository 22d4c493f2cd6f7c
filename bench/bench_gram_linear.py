"""gram_linear (T = 1): ours vs (A@A.T)*(E@E.T) through cuBLAS (CPU: PyTorch's CPU BLAS)."""
import pytest
import torch
from common import DEVICE, FULL, measure

import lowrank_kernels as lk

# (B, d_in, d_out): a linear layer at T = 1.
SHAPES = [(256, 4096, 4096), (1024, 1024, 1024), (128, 768, 3072), (64, 512, 512)]
if not FULL:
    SHAPES = [(256, 1024, 1024), (128, 768, 768), (64, 512, 512)]
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
OURS = "triton" if DEVICE == "cuda" else "native"


def _case(B, d_in, d_out, dtype):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(B, d_in, generator=g).to(DEVICE, dtype)
    E = torch.randn(B, d_out, generator=g).to(DEVICE, dtype)
    shape = f"B={B} d_in={d_in} d_out={d_out} {str(dtype).replace('torch.', '')}"
    # Upper triangle only: B(B+1)/2 entries, 2(d_in + d_out) flops each.
    flops = B * (B + 1) * (d_in + d_out)
    bytes_moved = (A.numel() + E.numel()) * A.element_size() + B * B * 4
    return A, E, shape, flops, bytes_moved


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("B,d_in,d_out", SHAPES)
def test_gram_linear_ours(benchmark, B, d_in, d_out, dtype):
    A, E, shape, flops, nbytes = _case(B, d_in, d_out, dtype)
    measure(benchmark, lambda: lk.gram_linear(A, E, backend=OURS), op="gram_linear",
            shape=shape, provider=f"ours ({OURS})", flops=flops, bytes_moved=nbytes, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("B,d_in,d_out", SHAPES)
def test_gram_linear_blas(benchmark, B, d_in, d_out, dtype):
    A, E, shape, flops, nbytes = _case(B, d_in, d_out, dtype)
    name = "cublas" if DEVICE == "cuda" else "torch-cpu-blas"
    measure(benchmark, lambda: (A @ A.T).float() * (E @ E.T).float(), op="gram_linear",
            shape=shape, provider=name, flops=flops, bytes_moved=nbytes, baseline=True,
            dtype=dtype)
