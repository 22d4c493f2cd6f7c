"""Embedding per-sample-gradient ops (g_i = Σ_t e_it ⊗ onehot(idx_it)): ours
(lowrank_kernels.<op>, backend auto) against the best exact plain PyTorch:

- Gram: the token-pair GEMM masked by index equality, and dense per-sample gradients
  (index_add_ into (B, N, d)) then their Gram;
- weighted sum U C (M, N, d): index_add_ of the c-scaled rows, into (M, N, d) along dim 1 and
  into (N, M·d) along dim 0 (returned as the (M, N, d) view);
- projection Uᵀ V: a gather of V's rows and dots with E, as a product-sum and as an einsum.
"""
import torch
from common import DEVICE, FULL, MAX_BYTES, Case, Setup, baseline, ours

import lowrank_kernels as lk

# (B, T, num_embeddings, d)
SHAPES = [(32, 128, 32000, 768), (16, 512, 50257, 1024), (128, 32, 32000, 512)]
if not FULL:
    SHAPES = [(8, 32, 1000, 64), (4, 128, 5000, 128)]
M = 8  # directions for the (B, m) forms


def _inputs(B, T, N, d):
    g = torch.Generator().manual_seed(0)
    # Zipf-like token frequencies, as in text: small indices are common.
    idx = (torch.rand(B, T, generator=g) ** 3 * N).long().clamp_(max=N - 1).to(DEVICE)
    E = torch.randn(B, T, d, generator=g).to(DEVICE)
    return idx, E


def _gram(B, T, N, d):
    def build():
        idx, E = _inputs(B, T, N, d)
        flat, rows = E.reshape(B * T, d), idx.reshape(-1)

        def masked():
            pairs = (flat @ flat.T) * (rows[:, None] == rows[None, :])
            return pairs.view(B, T, B, T).sum((1, 3))

        def dense():
            offsets = (idx + N * torch.arange(B, device=DEVICE)[:, None]).reshape(-1)
            G = torch.zeros(B * N, d, device=DEVICE).index_add_(0, offsets, flat).view(B, N * d)
            return G @ G.T

        bases, notes = [], {}
        for name, fn, need in (("torch masked token-pair GEMM", masked, 2 * (B * T) ** 2 * 4),
                               ("torch dense per-sample + GEMM", dense, B * N * d * 4)):
            if need <= MAX_BYTES:
                bases.append(baseline(name, fn))
            else:
                notes[f"{name} left out"] = f"needs {need / 2**30:.1f} GiB"
        return Setup([ours("", lambda: lk.gram_embedding(idx, E, N))] + bases,
                     flops=B * (B + 1) * T * T * d,  # upper triangle of token pairs
                     bytes_moved=E.numel() * 4 + idx.numel() * 8 + B * B * 4, notes=notes)
    return build


def _weighted_sum(B, T, N, d):
    def build():
        idx, E = _inputs(B, T, N, d)
        c = torch.randn(B, M, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        flat, rows = E.reshape(B * T, d), idx.reshape(-1)

        def along_dim1():
            weights = c.repeat_interleave(T, 0)  # (B·T, M)
            return torch.zeros(M, N, d, device=DEVICE).index_add_(
                1, rows, weights.T[:, :, None] * flat[None])

        def along_dim0():
            values = (c.repeat_interleave(T, 0)[:, :, None] * flat[:, None]).view(B * T, M * d)
            out = torch.zeros(N, M * d, device=DEVICE).index_add_(0, rows, values)
            return out.view(N, M, d).transpose(0, 1)

        return Setup([ours("", lambda: lk.weighted_sum_embedding(idx, E, c, N)),
                      baseline("torch index_add_ (M, N, d)", along_dim1),
                      baseline("torch index_add_ (N, M·d)", along_dim0)],
                     flops=2 * B * T * d * M,
                     bytes_moved=E.numel() * 4 + idx.numel() * 8 + M * N * d * 4)
    return build


def _project(B, T, N, d):
    def build():
        idx, E = _inputs(B, T, N, d)
        V = torch.randn(M, N, d, generator=torch.Generator().manual_seed(2)).to(DEVICE)
        flat, rows = E.reshape(B * T, d), idx.reshape(-1)

        def gather_dot():
            return (V[:, idx] * E[None]).sum((-1, -2)).T

        def einsum():
            return torch.einsum("mnd,nd->nm", V.index_select(1, rows), flat).view(
                B, T, M).sum(1)

        return Setup([ours("", lambda: lk.project_embedding(idx, E, V)),
                      baseline("torch gather + dot", gather_dot),
                      baseline("torch index_select + einsum", einsum)],
                     flops=2 * B * T * d * M,
                     bytes_moved=E.numel() * 4 + idx.numel() * 8 + M * B * T * d * 4)
    return build


CASES = []
for _s in SHAPES:
    _shape = "B={} T={} N={} d={} float32".format(*_s)
    CASES += [Case("gram_embedding", _shape, _gram(*_s)),
              Case("weighted_sum_embedding", f"{_shape} m={M}", _weighted_sum(*_s)),
              Case("project_embedding", f"{_shape} m={M}", _project(*_s))]
