"""Embedding per-sample-gradient ops: ours (Triton on GPU, the reference on CPU) against plain
PyTorch — the token-pair Gram with the index-equality mask as one masked GEMM, index_add_ for
the weighted sum, a gather and a dot for the projection."""
import pytest
import torch
from common import DEVICE, FULL, measure

import lowrank_kernels as lk

# (B, T, num_embeddings, d)
SHAPES = [(32, 128, 32000, 768), (16, 512, 50257, 1024), (128, 32, 32000, 512)]
if not FULL:
    SHAPES = [(8, 32, 1000, 64), (4, 128, 5000, 128)]
OURS = "triton" if DEVICE == "cuda" else "reference"
M = 8  # directions for the (B, m) forms


def _case(B, T, N, d, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    # Zipf-like token frequencies, as in text: small indices are common.
    idx = (torch.rand(B, T, generator=g) ** 3 * N).long().clamp_(max=N - 1).to(DEVICE)
    E = torch.randn(B, T, d, generator=g).to(DEVICE, dtype)
    return idx, E, f"B={B} T={T} N={N} d={d} {str(dtype).replace('torch.', '')}"


def _check(ours, baseline):
    """Ours agrees with the baseline to fp32 accumulation error (relative to the largest entry)."""
    ours, baseline = ours.double(), baseline.double()
    scale = float(baseline.abs().max()) or 1.0
    assert float((ours - baseline).abs().max()) <= 1e-4 * scale


def _torch_gram(idx, E):
    B, T, d = E.shape
    flat, rows = E.reshape(B * T, d).float(), idx.reshape(-1)
    pairs = (flat @ flat.T) * (rows[:, None] == rows[None, :])
    return pairs.view(B, T, B, T).sum((1, 3))


@pytest.mark.parametrize("B,T,N,d", SHAPES)
@pytest.mark.parametrize("provider", ["ours", "torch"])
def test_gram_embedding(benchmark, B, T, N, d, provider):
    idx, E, shape = _case(B, T, N, d)
    flops = B * (B + 1) * T * T * d  # upper triangle of token pairs, 2d flops each
    nbytes = E.numel() * E.element_size() + idx.numel() * 8 + B * B * 4
    if provider == "torch" and (B * T) ** 2 * 4 > 8 * 2 ** 30:
        pytest.skip("the masked token-pair matrix would take more than 8 GiB")
    fn = (lambda: lk.gram_embedding(idx, E, N, backend=OURS)) if provider == "ours" else \
        (lambda: _torch_gram(idx, E))
    if provider == "torch":
        _check(lk.gram_embedding(idx, E, N, backend=OURS), fn())
    measure(benchmark, fn, op="gram_embedding", shape=shape,
            provider=f"ours ({OURS})" if provider == "ours" else "torch masked GEMM",
            flops=flops, bytes_moved=nbytes, baseline=provider != "ours")


@pytest.mark.parametrize("B,T,N,d", SHAPES)
@pytest.mark.parametrize("provider", ["ours", "torch"])
def test_weighted_sum_embedding(benchmark, B, T, N, d, provider):
    idx, E, shape = _case(B, T, N, d)
    c = torch.randn(B, M, device=DEVICE)
    nbytes = E.numel() * E.element_size() + idx.numel() * 8 + M * N * d * 4

    def baseline():
        out = torch.zeros(M, N, d, device=DEVICE)
        weights = c.repeat_interleave(T, 0)
        return out.index_add_(1, idx.reshape(-1), weights.T[:, :, None] * E.reshape(B * T, d)[None])

    fn = (lambda: lk.weighted_sum_embedding(idx, E, c, N, backend=OURS)) \
        if provider == "ours" else baseline
    if provider == "torch":
        _check(lk.weighted_sum_embedding(idx, E, c, N, backend=OURS), fn())
    measure(benchmark, fn, op="weighted_sum_embedding", shape=f"{shape} m={M}",
            provider=f"ours ({OURS})" if provider == "ours" else "torch index_add_",
            flops=2 * B * T * d * M, bytes_moved=nbytes, baseline=provider != "ours")


@pytest.mark.parametrize("B,T,N,d", SHAPES)
@pytest.mark.parametrize("provider", ["ours", "torch"])
def test_project_embedding(benchmark, B, T, N, d, provider):
    idx, E, shape = _case(B, T, N, d)
    V = torch.randn(M, N, d, device=DEVICE)
    nbytes = E.numel() * E.element_size() + idx.numel() * 8 + M * B * T * d * 4

    def baseline():
        return (V[:, idx] * E[None]).sum((-1, -2)).T

    fn = (lambda: lk.project_embedding(idx, E, V, backend=OURS)) \
        if provider == "ours" else baseline
    if provider == "torch":
        _check(lk.project_embedding(idx, E, V, backend=OURS), fn())
    measure(benchmark, fn, op="project_embedding", shape=f"{shape} m={M}",
            provider=f"ours ({OURS})" if provider == "ours" else "torch gather+dot",
            flops=2 * B * T * d * M, bytes_moved=nbytes, baseline=provider != "ours")
