"""Linear-over-tokens and Conv2d per-sample-gradient ops (gram, weighted_sum, project): ours
(Triton on GPU, the reference on CPU) against the best pure-PyTorch formulations —
the token-pair einsum, bmm per-sample gradients + GEMM, torch.func.vmap(grad) per-sample
gradients — and, for the weighted sum and the projection, a cuBLAS GEMM of the same shape."""
import pytest
import torch
import torch.nn.functional as F
from common import DEVICE, FULL, measure

import lowrank_kernels as lk
from lowrank_kernels.ops.gram_linear import choose_route

# GPT-2-small layers at B = 32, T = 512: (B, T, d_in, d_out); and a plain T = 1 layer.
LINEAR = [(32, 512, 768, 2304), (32, 512, 768, 768), (32, 512, 768, 3072),
          (32, 512, 3072, 768), (256, 1, 4096, 4096)]
# ResNet-18 / CIFAR 3×3 convs (padding 1) at B = 32: (B, C_in, C_out, H = W); d_in = 9·C_in.
CONV = [(32, 3, 64, 32), (32, 64, 64, 32), (32, 128, 128, 16), (32, 256, 256, 8),
        (32, 512, 512, 4)]
if not FULL:
    LINEAR = [(4, 64, 64, 192), (4, 32, 128, 128), (16, 1, 256, 256)]
    CONV = [(4, 3, 16, 16), (4, 16, 16, 16), (4, 32, 32, 8)]
OURS = "triton" if DEVICE == "cuda" else "reference"
M = 4  # directions / coefficient columns of the matrix forms
MAX_BYTES = 8 << 30  # a baseline that would allocate more is skipped


def _linear(B, T, d_in, d_out):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(B, T, d_in, generator=g).to(DEVICE)
    E = torch.randn(B, T, d_out, generator=g).to(DEVICE)
    return A, E, f"linear B={B} T={T} {d_in}->{d_out}"


def _conv(B, C_in, C_out, hw):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(B, C_in, hw, hw, generator=g).to(DEVICE)
    E = torch.randn(B, C_out, hw, hw, generator=g).to(DEVICE)
    return X, E, f"conv3x3 B={B} {C_in}->{C_out} T={hw * hw}"


def _tokens(X, E):
    """A conv's unfolded input (B, T, 9·C_in) and output gradient (B, T, C_out)."""
    return F.unfold(X, 3, padding=1).transpose(1, 2), E.flatten(2).transpose(1, 2)


def _check(ours, baseline):
    ours, baseline = ours.double(), baseline.double()
    scale = float(baseline.abs().max()) or 1.0
    assert float((ours - baseline).abs().max()) <= 1e-4 * scale


def _gram_flops(B, T, d_in, d_out):
    """Flops of the route ours takes (upper triangle)."""
    pairs = B * (B + 1) // 2
    if choose_route(B, B, T, d_in, d_out, 1, False, False, False) == "token_pair":
        return pairs * T * T * 2 * (d_in + d_out)
    return 2 * B * T * d_in * d_out + 2 * pairs * d_in * d_out


def _gram_baselines(A, E):
    """Pure-PyTorch K = UᵀU by the token-pair einsum, bmm per-sample gradients, and vmap."""
    B, T, d_in = A.shape
    d_out = E.shape[2]

    def token_pair():
        flat_a, flat_e = A.reshape(B * T, d_in), E.reshape(B * T, d_out)
        return ((flat_a @ flat_a.T) * (flat_e @ flat_e.T)).view(B, T, B, T).sum((1, 3))

    def per_sample_bmm():
        G = torch.bmm(E.transpose(1, 2), A).flatten(1)
        return G @ G.T

    def per_sample_vmap():
        W = torch.zeros(d_out, d_in, device=A.device)
        loss = lambda w, a, e: (F.linear(a, w) * e).sum()  # noqa: E731  (∂/∂w = eᵀ a)
        G = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(W, A, E).flatten(1)
        return G @ G.T

    return {"torch token-pair einsum": (token_pair, 2 * (B * T) ** 2 * 4),
            "torch bmm per-sample + GEMM": (per_sample_bmm, B * d_in * d_out * 4),
            "torch.func vmap per-sample": (per_sample_vmap, B * d_in * d_out * 4)}


GRAM_PROVIDERS = ["ours", "torch token-pair einsum", "torch bmm per-sample + GEMM",
                  "torch.func vmap per-sample"]


def _run_gram(benchmark, provider, op, shape, ours, A, E, nbytes):
    B, T, d_in = A.shape
    d_out = E.shape[2]
    flops = _gram_flops(B, T, d_in, d_out)
    if provider == "ours":
        fn, label = ours, f"ours ({OURS})"
    else:
        fn, need = _gram_baselines(A, E)[provider]
        if need > MAX_BYTES:
            pytest.skip(f"{provider} would allocate {need / 2**30:.1f} GiB")
        _check(ours(), fn())
        label = provider
    measure(benchmark, fn, op=op, shape=shape, provider=label, flops=flops, bytes_moved=nbytes,
            baseline=provider != "ours")


@pytest.mark.parametrize("B,T,d_in,d_out", LINEAR)
@pytest.mark.parametrize("provider", GRAM_PROVIDERS)
def test_gram_linear_tokens(benchmark, B, T, d_in, d_out, provider):
    A, E, shape = _linear(B, T, d_in, d_out)
    nbytes = (A.numel() + E.numel()) * 4 + B * B * 4
    _run_gram(benchmark, provider, "gram_linear", shape,
              lambda: lk.gram_linear(A, E, backend=OURS), A, E, nbytes)


@pytest.mark.parametrize("B,C_in,C_out,hw", CONV)
@pytest.mark.parametrize("provider", GRAM_PROVIDERS)
def test_gram_conv2d(benchmark, B, C_in, C_out, hw, provider):
    X, E, shape = _conv(B, C_in, C_out, hw)
    nbytes = (X.numel() + E.numel()) * 4 + B * B * 4  # ours reads X by implicit im2col
    _run_gram(benchmark, provider, "gram_conv2d", shape,
              lambda: lk.gram_conv2d(X, E, 3, padding=1, backend=OURS), *_tokens(X, E), nbytes)


def _run_weighted_sum(benchmark, provider, op, shape, ours, A, E):
    """U C for C (B, M): ours vs (C ⊙ E)ᵀ A as M GEMMs and a cuBLAS GEMM Eᵀ A of one column."""
    B, T, d_in = A.shape
    d_out = E.shape[2]
    g = torch.Generator().manual_seed(1)
    C = torch.randn(B, M, generator=g).to(DEVICE)
    nbytes = (A.numel() + E.numel()) * A.element_size() + M * d_out * d_in * 4
    flops = 2 * B * T * d_in * d_out * M
    flat_a, flat_e = A.reshape(B * T, d_in), E.reshape(B * T, d_out)

    def torch_scaled():
        rows = C.repeat_interleave(T, 0)
        return torch.stack([(flat_e * rows[:, j, None]).T @ flat_a for j in range(M)])

    def gemm():  # the same shape, M times: the floor a fused kernel should reach
        return torch.stack([flat_e.T @ flat_a for _ in range(M)])

    fn, label = {"ours": (lambda: ours(C), f"ours ({OURS})"),
                 "torch scaled GEMM": (torch_scaled, "torch scaled GEMM"),
                 "cublas GEMM same shape": (gemm, "cublas GEMM same shape" if DEVICE == "cuda"
                                            else "torch-cpu GEMM same shape")}[provider]
    if provider == "torch scaled GEMM":
        _check(ours(C)[0].reshape(M, d_out, -1), fn())
    measure(benchmark, fn, op=op, shape=f"{shape} m={M}", provider=label, flops=flops,
            bytes_moved=nbytes, baseline=provider != "ours")


WS_PROVIDERS = ["ours", "torch scaled GEMM", "cublas GEMM same shape"]


@pytest.mark.parametrize("B,T,d_in,d_out", LINEAR)
@pytest.mark.parametrize("provider", WS_PROVIDERS)
def test_weighted_sum_linear(benchmark, B, T, d_in, d_out, provider):
    A, E, shape = _linear(B, T, d_in, d_out)
    _run_weighted_sum(benchmark, provider, "weighted_sum_linear", shape,
                      lambda C: lk.weighted_sum_linear(A, E, C, backend=OURS), A, E)


@pytest.mark.parametrize("B,C_in,C_out,hw", CONV)
@pytest.mark.parametrize("provider", WS_PROVIDERS)
def test_weighted_sum_conv2d(benchmark, B, C_in, C_out, hw, provider):
    X, E, shape = _conv(B, C_in, C_out, hw)
    _run_weighted_sum(benchmark, provider, "weighted_sum_conv2d", shape,
                      lambda C: lk.weighted_sum_conv2d(X, E, C, 3, padding=1, backend=OURS),
                      *_tokens(X, E))


def _run_project(benchmark, provider, op, shape, ours, A, E):
    """Uᵀ V for M directions: ours vs Y = A Vᵀ then rowwise dots, and the GEMM A Vᵀ alone."""
    B, T, d_in = A.shape
    d_out = E.shape[2]
    g = torch.Generator().manual_seed(2)
    V = torch.randn(M, d_out, d_in, generator=g).to(DEVICE)
    nbytes = (A.numel() + E.numel()) * A.element_size() + V.numel() * 4
    flops = 2 * B * T * d_in * d_out * M
    flat_a = A.reshape(B * T, d_in)

    def torch_project():
        Y = (flat_a @ V.reshape(M * d_out, d_in).T).view(B, T, M, d_out)
        return (Y * E[:, :, None]).sum((1, 3))

    fn, label = {"ours": (lambda: ours(V), f"ours ({OURS})"),
                 "torch GEMM + dot": (torch_project, "torch GEMM + dot"),
                 "cublas GEMM same shape": (lambda: flat_a @ V.reshape(M * d_out, d_in).T,
                                            "cublas GEMM same shape" if DEVICE == "cuda"
                                            else "torch-cpu GEMM same shape")}[provider]
    if provider == "torch GEMM + dot":
        _check(ours(V), fn())
    measure(benchmark, fn, op=op, shape=f"{shape} m={M}", provider=label, flops=flops,
            bytes_moved=nbytes, baseline=provider != "ours")


PROJECT_PROVIDERS = ["ours", "torch GEMM + dot", "cublas GEMM same shape"]


@pytest.mark.parametrize("B,T,d_in,d_out", LINEAR)
@pytest.mark.parametrize("provider", PROJECT_PROVIDERS)
def test_project_linear(benchmark, B, T, d_in, d_out, provider):
    A, E, shape = _linear(B, T, d_in, d_out)
    _run_project(benchmark, provider, "project_linear", shape,
                 lambda V: lk.project_linear(A, E, V, backend=OURS), A, E)


@pytest.mark.parametrize("B,C_in,C_out,hw", CONV)
@pytest.mark.parametrize("provider", PROJECT_PROVIDERS)
def test_project_conv2d(benchmark, B, C_in, C_out, hw, provider):
    X, E, shape = _conv(B, C_in, C_out, hw)
    _run_project(benchmark, provider, "project_conv2d", shape,
                 lambda V: lk.project_conv2d(X, E, V.view(M, C_out, C_in, 3, 3), padding=1,
                                             backend=OURS), *_tokens(X, E))
