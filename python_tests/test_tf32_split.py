"""The TF32 split that gives the 16-bit weighted sums fp32 accumulation on the tensor cores
(triton/token_rows.split_tf32): both pieces are TF32 values (a TF32 operand reads them without
loss) and hi + lo is within max(2⁻²³|x|, 2⁻¹³⁷) of x over fp32's whole range. The interpreter multiplies
fp32 dot operands in full fp32 whatever the input_precision, so the kernels are also run with
a dot that truncates TF32 operands to 10 mantissa bits, as the hardware may: their fp16 results
stay within the fp32-accumulation bound of their docstrings."""
import os

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from fuzz_strategies import coeff
from numerics import assert_within

import lowrank_kernels as lk
from lowrank_kernels.triton.token_rows import split_tf32

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _split_kernel(X, HI, LO, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    hi, lo = split_tf32(tl.load(X + i, mask=i < n, other=0.0))
    tl.store(HI + i, hi, mask=i < n)
    tl.store(LO + i, lo, mask=i < n)


def _values():
    g = torch.Generator().manual_seed(0)
    mantissa = torch.rand(20000, generator=g) + 1.0
    exponent = torch.randint(-149, 127, (20000,), generator=g).float()
    sign = torch.where(torch.rand(20000, generator=g) < 0.5, -1.0, 1.0)
    random = (sign.double() * mantissa.double() * torch.exp2(exponent.double())).float()
    # Ties at 11 and 22 bits, all-ones mantissas, powers of two, subnormals, the largest values.
    bits = torch.tensor([0x3F801000, 0x3F803000, 0x3F800800, 0x3F800C00, 0x3FFFFFFF, 0x3F800001,
                         0x3F7FFFFF, 0x00000001, 0x007FFFFF, 0x00400000, 0x7F7FE000, 0x7F7FEFFF,
                         0x3F801800, 0x3F800FFF], dtype=torch.int64).to(torch.int32)
    special = bits.view(torch.float32)
    return torch.cat([random, special, -special, torch.tensor([0.0, 1.0, -1.0])])


def test_split_pieces_are_tf32_values_within_two_ulp():
    x = _values().to(DEVICE)
    hi, lo = torch.empty_like(x), torch.empty_like(x)
    _split_kernel[(triton.cdiv(x.numel(), 1024),)](x, hi, lo, x.numel(), BLOCK=1024)
    for piece in (hi, lo):
        assert torch.isfinite(piece).all()
        assert ((piece.view(torch.int32) & 0x1FFF) == 0).all(), "not a TF32 value"
    x64, err = x.double(), (hi.double() + lo.double() - x.double()).abs()
    bound = torch.maximum(2.0 ** -23 * x64.abs(), torch.tensor(2.0 ** -137, dtype=torch.float64))
    assert (err <= bound).all(), float((err - bound).max())
    # lo is the rounded remainder: at most 2⁻¹¹ of |x| (hi is x rounded to nearest).
    assert (lo.double().abs() <= 2.0 ** -11 * x64.abs()).all()


@pytest.fixture
def truncating_tf32_dot(monkeypatch):
    """The interpreter's dot with TF32 operands cut to 10 mantissa bits (round toward zero)."""
    from triton.runtime import interpreter
    builder, tf32 = interpreter.interpreter_builder, interpreter._ir.INPUT_PRECISION.TF32
    create_dot = builder.create_dot

    def cut(handle):
        data = handle.data
        if data.dtype != np.float32:
            return handle
        cut_data = (data.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)
        return interpreter.TensorHandle(cut_data, handle.dtype.scalar)

    def dot(a, b, d, input_precision, max_num_imprecise_acc):
        if input_precision == tf32:
            a, b = cut(a), cut(b)
        return create_dot(a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(builder, "create_dot", dot)


def _coefficients(B, m, g):
    """fp32 coefficients over 2⁻³⁰..2⁶ (most of them far from fp16's range)."""
    c = torch.randn(B, m, generator=g) * torch.exp2(torch.randint(-30, 6, (B, m), generator=g))
    return c.float()


def _within(out, exact, magnitude, n, what):
    assert out.dtype == torch.float32
    assert_within(out, exact, coeff(n, torch.float16) * magnitude + 1e-30, what)


@pytest.mark.skipif(not INTERPRETED, reason="emulates the GPU's TF32 operand read")
@pytest.mark.usefixtures("truncating_tf32_dot")
def test_fp16_weighted_sums_accumulate_in_fp32_under_tf32_operands():
    g = torch.Generator().manual_seed(1)
    B, T, d_in, d_out, m = 6, 5, 9, 7, 3
    A = torch.randn(B, T, d_in, generator=g).half()
    E = (torch.randn(B, T, d_out, generator=g) * 1e-3).half()
    c = _coefficients(B, m, g)
    W, b = lk.weighted_sum_linear(A, E, c, True, backend="triton")
    A1 = torch.cat([A.double(), torch.ones(B, T, 1, dtype=torch.float64)], -1)
    exact = torch.einsum("bm,bto,bti->moi", c.double(), E.double(), A1)
    mag = torch.einsum("bm,bto,bti->moi", c.double().abs(), E.double().abs(), A1.abs())
    n = B * T + 3  # the docstring's (N + 3)u
    _within(W, exact[..., :d_in], mag[..., :d_in], n, "weighted_sum_linear W")
    _within(b, exact[..., d_in], mag[..., d_in], n, "weighted_sum_linear bias")

    X = torch.randn(B, 4, 5, 5, generator=g).half()
    Ec = (torch.randn(B, 6, 5, 5, generator=g) * 1e-3).half()
    Wc, bc = lk.weighted_sum_conv2d(X, Ec, c, [3, 3], padding=[1, 1], bias=True,
                                    backend="triton")
    cols = torch.nn.functional.unfold(X.double(), 3, padding=1)  # (B, 36, 25)
    exact = torch.einsum("bm,bot,bkt->mok", c.double(), Ec.double().flatten(2), cols)
    mag = torch.einsum("bm,bot,bkt->mok", c.double().abs(), Ec.double().abs().flatten(2),
                       cols.abs())
    n = B * 25 + 3
    _within(Wc.flatten(2), exact, mag, n, "weighted_sum_conv2d W")
    exact_b = torch.einsum("bm,bot->mo", c.double(), Ec.double().flatten(2))
    mag_b = torch.einsum("bm,bot->mo", c.double().abs(), Ec.double().abs().flatten(2))
    _within(bc, exact_b, mag_b, n, "weighted_sum_conv2d bias")

    N = 4
    idx = torch.randint(N, (B, T), generator=g)
    Ee = torch.randn(B, T, 5, generator=g).half()
    out = lk.weighted_sum_embedding(idx, Ee, c, N, backend="triton")
    one_hot = torch.nn.functional.one_hot(idx, N).double()  # (B, T, N)
    exact = torch.einsum("bm,btn,btd->mnd", c.double(), one_hot, Ee.double())
    mag = torch.einsum("bm,btn,btd->mnd", c.double().abs(), one_hot, Ee.double().abs())
    _within(out, exact, mag, B * T + 2, "weighted_sum_embedding")
