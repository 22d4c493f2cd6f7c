"""Hypothesis strategies and float64 oracles for the property-based fuzz suite (test_fuzz_ops).

Inputs: values drawn from a seeded torch.Generator (the seed is a hypothesis draw, so a
failing example prints everything needed to rebuild it), scaled by a power of two, with
random exact zeros, rounded to the dtype under test, then laid out in memory in one of
several ways with the same logical values (contiguous, strided with an offset, transposed,
stride-0 expanded, channels_last).

Oracles: independent float64 formulations (per-sample gradients built explicitly, the dense
Hadamard matrix, torch.linalg.solve, a pure-Python Philox), never the op under test. Bounds:
a priori, γ_n·M with M the same computation on |inputs| (numerics.py), n the length of the
longest rounding chain of any route (over-counted, never an atol).
"""
import dataclasses
import math

import torch
from hypothesis import strategies as st
from numerics import gamma

U = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
     torch.bfloat16: 2.0 ** -8}
NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
         torch.float64: "fp64"}


def acc_dtype(dtype):
    """The accumulation (and result) dtype of every layer op: float64 for float64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def unit(dtype):
    """Unit roundoff of the accumulator for inputs of `dtype`."""
    return U[acc_dtype(dtype)]


def coeff(n, dtype):
    """γ_n + u of the accumulator (the final rounding of a result computed in it)."""
    u = unit(dtype)
    return gamma(n, u) + u


# ---- values and layouts --------------------------------------------------------------------

LAYOUTS = ("contiguous", "strided", "transposed", "expanded")


@dataclasses.dataclass
class Draw:
    """Wraps hypothesis' `data` with the tensor factories of one example."""
    data: object
    dtype: torch.dtype
    layouts: tuple = LAYOUTS

    def draw(self, strategy, label=None):
        return self.data.draw(strategy, label=label)

    def int(self, lo, hi, label=None):
        return self.draw(st.integers(lo, hi), label)

    def bool(self, label=None):
        return self.draw(st.booleans(), label)

    def pick(self, options, label=None):
        return self.draw(st.sampled_from(list(options)), label)

    def values(self, shape, label, dtype=None, scale_exp=(-4, 4), positive=False):
        """float64 values of `shape` (already exactly representable in `dtype`)."""
        dtype = dtype or self.dtype
        seed = self.int(0, 2 ** 31 - 1, f"{label}.seed")
        exp = self.int(*scale_exp, f"{label}.scale_exp")
        zeros = self.pick((0.0, 0.0, 0.3), f"{label}.zero_fraction")
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 ** exp
        if positive:
            x = x.abs()
        if zeros:
            x = x * (torch.rand(shape, generator=g, dtype=torch.float64) >= zeros)
        return x.to(dtype).double()

    def tensor(self, shape, label, dtype=None, layouts=None, **kw):
        """(t, t64): t in `dtype` with a drawn memory layout, t64 its float64 values."""
        dtype = dtype or self.dtype
        layouts = self.layouts if layouts is None else layouts
        kind = self.pick(layouts, f"{label}.layout")
        shape = tuple(shape)
        if kind == "expanded" and len(shape):
            dim = self.int(0, len(shape) - 1, f"{label}.expanded_dim")
            small = shape[:dim] + (1,) + shape[dim + 1:]
            x64 = self.values(small, label, dtype, **kw).expand(shape)
            return x64.to(dtype).expand(shape), x64
        x64 = self.values(shape, label, dtype, **kw)
        return lay_out(x64.to(dtype), kind, self, label), x64

    def index(self, shape, high, label, layouts=None):
        """An int64 index tensor in [0, high) with a drawn layout (values and layout)."""
        seed = self.int(0, 2 ** 31 - 1, f"{label}.seed")
        g = torch.Generator().manual_seed(seed)
        few = self.bool(f"{label}.repeats")  # most indices in a few rows
        u = torch.rand(shape, generator=g)
        idx = ((u ** 3 if few else u) * high).long().clamp_(max=max(high - 1, 0))
        kind = self.pick(self.layouts if layouts is None else layouts, f"{label}.layout")
        if kind == "expanded" and len(shape):
            dim = self.int(0, len(shape) - 1, f"{label}.expanded_dim")
            idx = idx.narrow(dim, 0, min(1, shape[dim])).expand(shape) if shape[dim] else idx
            return idx
        return lay_out(idx, kind, self, label)


def lay_out(t, kind, draw, label):
    """t's values in a tensor of the layout `kind`."""
    if kind == "contiguous" or t.dim() == 0:
        return t.contiguous()
    if kind == "strided":  # last dim stride 2, a storage offset of 1
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype)
        wide[..., 1::2] = t
        return wide[..., 1::2]
    if kind == "transposed":
        if t.dim() < 2:
            return lay_out(t, "strided", draw, label)
        a = draw.int(0, t.dim() - 2, f"{label}.transpose_dim")
        return t.transpose(a, t.dim() - 1).contiguous().transpose(a, t.dim() - 1)
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "expanded":  # (0-d, or drawn by Draw.tensor/index where values allow it)
        return t
    raise ValueError(kind)


# ---- float64 oracles -------------------------------------------------------------------------

def linear_grads(A, E, bias):
    """Per-sample gradients of a Linear weight [and bias], (B, d_out, d_in [+ 1]) float64:
    g_i = Σ_t e_it ã_itᵀ."""
    A3, E3 = (A, E) if A.dim() == 3 else (A[:, None], E[:, None])
    if bias:
        A3 = torch.cat([A3, A3.new_ones(A3.shape[:-1] + (1,))], -1)
    return torch.einsum("bto,bti->boi", E3, A3)


def conv_grads(X, E, kernel_size, stride, padding, dilation, groups, bias):
    """Per-sample gradients of a Conv2d weight, (B, C_out, C_in/groups, kh, kw), and of its
    bias (B, C_out) or None, float64, by torch.nn.grad.conv2d_weight one sample at a time."""
    B, C_in = X.shape[:2]
    C_out = E.shape[1]
    shape = (C_out, C_in // groups, *kernel_size)
    W = [torch.nn.grad.conv2d_weight(X[i:i + 1], shape, E[i:i + 1], stride, padding, dilation,
                                     groups) for i in range(B)]
    W = torch.stack(W) if B else X.new_zeros((0, *shape))
    return W, (E.sum((2, 3)) if bias else None)


def embedding_grads(idx, E, N, padding_idx):
    """Per-sample gradients of an Embedding weight, (B, N, d) float64: row r of g_i is
    Σ_t [idx_it = r ≠ padding_idx] e_it."""
    B, T, d = E.shape
    G = E.new_zeros((B, N, d))
    sample = torch.arange(B)[:, None].expand(B, T)
    keep = torch.ones_like(idx, dtype=torch.bool) if padding_idx is None else \
        idx != padding_idx % N
    G.index_put_((sample[keep], idx[keep]), E[keep], accumulate=True)
    return G


def hadamard(n):
    i = torch.arange(n)
    bits = (i[:, None] & i[None, :])
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return 1.0 - 2.0 * parity.double()


# Philox4x32-10 in Python integers: an oracle independent of the package's three generators.
_M0, _M1, _W0, _W1, _MASK = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85, 0xFFFFFFFF


def philox(counter, key):
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = _M0 * c0, _M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & _MASK, p1 & _MASK, \
            ((p0 >> 32) ^ c3 ^ k1) & _MASK, p0 & _MASK
        k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
    return c0, c1, c2, c3


def omega_entry_words(i, group, seed):
    return philox((group, i & _MASK, (i >> 32) & _MASK, 0), (seed & _MASK, (seed >> 32) & _MASK))


def omega_python(rows, cols, seed, rademacher):
    """Ω[rows, cols] by the float64 formula (Box–Muller in float64, unrounded; the op's
    float32 Box–Muller is documented within 4 float32 ulps of it), or the Rademacher signs."""
    out = torch.empty(len(rows), len(cols), dtype=torch.float64)
    for a, i in enumerate(rows):
        for b, j in enumerate(cols):
            x = omega_entry_words(int(i), j // 4, seed)
            q = j % 4
            if rademacher:
                v = 1.0 - 2.0 * (x[q] >> 31)
            else:
                w0, w1 = (x[0], x[1]) if q < 2 else (x[2], x[3])
                u, v_ = (w0 + 0.5) * 2.0 ** -32, (w1 + 0.5) * 2.0 ** -32
                r, theta = math.sqrt(-2.0 * math.log(u)), 6.283185307179586 * v_
                v = r * (math.cos(theta) if q % 2 == 0 else math.sin(theta))
            out[a, b] = v
    return out


def ulp32(x):
    """The float32 ulp of each |x| (float64 tensor), 2^-149 at least."""
    ax = x.abs().clamp_min(2.0 ** -126)
    return torch.ldexp(torch.ones_like(ax), (torch.floor(torch.log2(ax)) - 23).to(torch.int64))
