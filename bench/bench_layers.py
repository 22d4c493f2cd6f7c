"""Per-sample-gradient ops of a linear layer over tokens and of a 3×3 Conv2d (padding 1) —
the Gram K = UᵀU, the weighted sum U C and the projection Uᵀ V, U's columns the per-sample
gradients g_i = Σ_t e_it a_itᵀ — ours (lowrank_kernels.<op>, backend auto) against the best
exact plain-PyTorch formulations a user would write:

- Gram: the token-pair product ((A Aᵀ) ⊙ (E Eᵀ)) summed over token blocks, and per-sample
  gradients by one bmm then their Gram G Gᵀ;
- weighted sum: rows of E scaled by C then one GEMM, and per-sample gradients by bmm then
  Cᵀ G; for conv also torch.nn.grad.conv2d_weight per column of C;
- projection: Y = A Vᵀ then dots with E (for conv: F.conv2d with V as the weights), and
  per-sample gradients by bmm then G Vᵀ.
A conv baseline starts from X and E, so its time includes the unfold (im2col).

flops: the cheaper of the two exact routes (token-pair / per-sample for the Gram, direct /
per-sample for the weighted sum and the projection), the work an exact method needs.
"""
import torch
import torch.nn.functional as F
from common import DEVICE, FULL, MAX_BYTES, Case, Setup, baseline, ours

import lowrank_kernels as lk

# GPT-2-small layers at B = 32, T = 512: (B, T, d_in, d_out); and a plain T = 1 layer.
LINEAR = [(32, 512, 768, 2304), (32, 512, 768, 768), (32, 512, 768, 3072),
          (32, 512, 3072, 768), (256, 1, 4096, 4096)]
# ResNet-18 / CIFAR 3×3 convs (padding 1) at B = 32: (B, C_in, C_out, H = W); d_in = 9·C_in.
CONV = [(32, 3, 64, 32), (32, 64, 64, 32), (32, 128, 128, 16), (32, 256, 256, 8),
        (32, 512, 512, 4)]
if not FULL:
    LINEAR = [(4, 64, 64, 192), (4, 32, 128, 128), (16, 1, 256, 256)]
    CONV = [(4, 3, 16, 16), (4, 16, 16, 16), (4, 32, 32, 8)]
M = 4  # directions / coefficient columns of the matrix forms


def _linear(B, T, d_in, d_out):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(B, T, d_in, generator=g).to(DEVICE)
    E = torch.randn(B, T, d_out, generator=g).to(DEVICE)
    return A, E


def _conv(B, C_in, C_out, hw):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(B, C_in, hw, hw, generator=g).to(DEVICE)
    E = torch.randn(B, C_out, hw, hw, generator=g).to(DEVICE)
    return X, E


def _coefficients(B):
    return torch.randn(B, M, generator=torch.Generator().manual_seed(1)).to(DEVICE)


def _directions(d_out, d_in):
    return torch.randn(M, d_out, d_in, generator=torch.Generator().manual_seed(2)).to(DEVICE)


def _unfold(X):
    """The conv's per-token inputs (B, 9·C_in, T)."""
    return F.unfold(X, 3, padding=1)


def _gram_flops(B, T, d_in, d_out):
    pairs = B * (B + 1) // 2
    return min(pairs * T * T * 2 * (d_in + d_out),
               2 * B * T * d_in * d_out + 2 * pairs * d_in * d_out)


def _combine_flops(B, T, d_in, d_out):
    return min(2 * B * T * d_in * d_out * M, 2 * B * T * d_in * d_out + 2 * B * M * d_in * d_out)


def _gram_baselines(tokens, B, T, d_in, d_out):
    """tokens() -> (A (B, T, d_in), E (B, T, d_out)), views or fresh (im2col) tensors."""
    out, notes = [], {}

    def token_pair():
        A, E = tokens()
        a, e = A.reshape(B * T, d_in), E.reshape(B * T, d_out)
        return ((a @ a.T) * (e @ e.T)).view(B, T, B, T).sum((1, 3))

    def per_sample():
        A, E = tokens()
        G = torch.bmm(E.transpose(1, 2), A).flatten(1)  # (B, d_out·d_in)
        return G @ G.T

    for name, fn, need in (("torch token-pair", token_pair, 2 * (B * T) ** 2 * 4),
                           ("torch bmm per-sample + GEMM", per_sample, B * d_in * d_out * 4)):
        if need <= MAX_BYTES:
            out.append(baseline(name, fn))
        else:
            notes[f"{name} left out"] = f"needs {need / 2**30:.1f} GiB"
    return out, notes


def _linear_gram(B, T, d_in, d_out):
    def build():
        A, E = _linear(B, T, d_in, d_out)
        bases, notes = _gram_baselines(lambda: (A, E), B, T, d_in, d_out)
        return Setup([ours("", lambda: lk.gram_linear(A, E))] + bases,
                     flops=_gram_flops(B, T, d_in, d_out),
                     bytes_moved=(A.numel() + E.numel()) * 4 + B * B * 4, notes=notes)
    return build


def _conv_gram(B, C_in, C_out, hw):
    def build():
        X, E = _conv(B, C_in, C_out, hw)
        T, d_in = hw * hw, 9 * C_in

        def tokens():
            return _unfold(X).transpose(1, 2), E.flatten(2).transpose(1, 2)

        bases, notes = _gram_baselines(tokens, B, T, d_in, C_out)
        return Setup([ours("", lambda: lk.gram_conv2d(X, E, 3, padding=1))] + bases,
                     flops=_gram_flops(B, T, d_in, C_out),
                     bytes_moved=(X.numel() + E.numel()) * 4 + B * B * 4, notes=notes)
    return build


def _linear_weighted_sum(B, T, d_in, d_out):
    def build():
        A, E = _linear(B, T, d_in, d_out)
        C = _coefficients(B)

        def scaled_gemm():  # Σ_{i,t} c_ij e_it a_itᵀ: E's rows scaled per column, one GEMM
            Ec = (E.unsqueeze(2) * C[:, None, :, None]).reshape(B * T, M * d_out)
            return (Ec.T @ A.reshape(B * T, d_in)).view(M, d_out, d_in)

        def per_sample():
            G = torch.bmm(E.transpose(1, 2), A).reshape(B, d_out * d_in)
            return (C.T @ G).view(M, d_out, d_in)

        bases = [baseline("torch scaled rows + GEMM", scaled_gemm)]
        if B * d_in * d_out * 4 <= MAX_BYTES:
            bases.append(baseline("torch bmm per-sample + Cᵀ G", per_sample))
        return Setup([ours("", lambda: lk.weighted_sum_linear(A, E, C))] + bases,
                     flops=_combine_flops(B, T, d_in, d_out),
                     bytes_moved=(A.numel() + E.numel() + M * d_out * d_in) * 4)
    return build


def _conv_weighted_sum(B, C_in, C_out, hw):
    def build():
        X, E = _conv(B, C_in, C_out, hw)
        C = _coefficients(B)
        T, d_in = hw * hw, 9 * C_in
        shape = (M, C_out, C_in, 3, 3)

        def scaled_gemm():
            U = _unfold(X).transpose(1, 2).reshape(B * T, d_in)
            Ec = (E.flatten(2)[:, None] * C[:, :, None, None])  # (B, M, C_out, T)
            return (Ec.permute(1, 2, 0, 3).reshape(M * C_out, B * T) @ U).view(shape)

        def per_sample():
            G = torch.bmm(E.flatten(2), _unfold(X).transpose(1, 2)).reshape(B, -1)
            return (C.T @ G).view(shape)

        def conv2d_weight():  # autograd's own weight gradient, once per column of C
            return torch.stack([torch.nn.grad.conv2d_weight(
                X, shape[1:], E * C[:, j, None, None, None], padding=1) for j in range(M)])

        bases = [baseline("torch scaled rows + GEMM", scaled_gemm),
                 baseline("torch conv2d_weight per column", conv2d_weight)]
        if B * d_in * C_out * 4 <= MAX_BYTES:
            bases.append(baseline("torch bmm per-sample + Cᵀ G", per_sample))
        return Setup([ours("", lambda: lk.weighted_sum_conv2d(X, E, C, 3, padding=1))] + bases,
                     flops=_combine_flops(B, T, d_in, C_out),
                     bytes_moved=(X.numel() + E.numel() + M * C_out * d_in) * 4)
    return build


def _linear_project(B, T, d_in, d_out):
    def build():
        A, E = _linear(B, T, d_in, d_out)
        V = _directions(d_out, d_in)

        def gemm_dot():  # Y = A Vᵀ for every direction, then ⟨y_t, e_t⟩ summed over t
            Y = (A.reshape(B * T, d_in) @ V.reshape(M * d_out, d_in).T).view(B, T, M, d_out)
            return (Y * E[:, :, None]).sum((1, 3))

        def per_sample():
            G = torch.bmm(E.transpose(1, 2), A).reshape(B, d_out * d_in)
            return G @ V.reshape(M, d_out * d_in).T

        bases = [baseline("torch A Vᵀ + dot", gemm_dot)]
        if B * d_in * d_out * 4 <= MAX_BYTES:
            bases.append(baseline("torch bmm per-sample + G Vᵀ", per_sample))
        return Setup([ours("", lambda: lk.project_linear(A, E, V))] + bases,
                     flops=_combine_flops(B, T, d_in, d_out),
                     bytes_moved=(A.numel() + E.numel() + V.numel()) * 4)
    return build


def _conv_project(B, C_in, C_out, hw):
    def build():
        X, E = _conv(B, C_in, C_out, hw)
        V = _directions(C_out, 9 * C_in).view(M, C_out, C_in, 3, 3)

        def conv_dot():  # the conv with V as its weights, then dots with E
            Y = F.conv2d(X, V.reshape(M * C_out, C_in, 3, 3), padding=1)
            return (Y.view(B, M, C_out, hw * hw) * E.flatten(2)[:, None]).sum((2, 3))

        def per_sample():
            G = torch.bmm(E.flatten(2), _unfold(X).transpose(1, 2)).reshape(B, -1)
            return G @ V.reshape(M, -1).T

        bases = [baseline("torch conv2d(X, V) + dot", conv_dot)]
        if B * 9 * C_in * C_out * 4 <= MAX_BYTES:
            bases.append(baseline("torch bmm per-sample + G Vᵀ", per_sample))
        return Setup([ours("", lambda: lk.project_conv2d(X, E, V, padding=1))] + bases,
                     flops=_combine_flops(B, hw * hw, 9 * C_in, C_out),
                     bytes_moved=(X.numel() + E.numel() + V.numel()) * 4)
    return build


CASES = []
for _s in LINEAR:
    _shape = "linear B={} T={} {}->{}".format(*_s)
    CASES += [Case("gram_linear", _shape, _linear_gram(*_s)),
              Case("weighted_sum_linear", f"{_shape} m={M}", _linear_weighted_sum(*_s)),
              Case("project_linear", f"{_shape} m={M}", _linear_project(*_s))]
for _s in CONV:
    _shape = "conv3x3 B={} {}->{} T={}".format(*_s[:3], _s[3] ** 2)
    CASES += [Case("gram_conv2d", _shape, _conv_gram(*_s)),
              Case("weighted_sum_conv2d", f"{_shape} m={M}", _conv_weighted_sum(*_s)),
              Case("project_conv2d", f"{_shape} m={M}", _conv_project(*_s))]
