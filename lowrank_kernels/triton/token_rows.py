"""The token matrix of a layer input, as the Gram / weighted-sum / projection kernels read it:
row r = b·T + t of sample b, token t; the columns of one group. A linear layer's input is a
strided (B, T, d) view; a Conv2d's is read by implicit im2col from X (B, C_in, H, W), so the
unfolded (B, H_out·W_out, C_in·kh·kw) matrix is never stored."""
import dataclasses

import torch
import triton
import triton.language as tl


@triton.jit
def load_rows(X, rows, cols, row_end, n_cols, T, s0, s1, s2, col0):
    """X[b, t, col0 + cols] for rows = b·T + t (a strided (B, T, ·) view); 0 where
    rows ≥ row_end or cols ≥ n_cols. Row indices are < MAX_ROWS (Tokens checks it): the
    division by T is a 32-bit one (a 64-bit division is a subroutine call on the GPU)."""
    cols = cols.to(tl.int64)
    r32 = rows.to(tl.int32)
    b32 = r32 // T
    b = b32.to(tl.int64)
    t = (r32 - b32 * T).to(tl.int64)
    mask = (rows[:, None] < row_end) & (cols[None, :] < n_cols)
    offs = b[:, None] * s0 + t[:, None] * s1 + (col0 + cols)[None, :] * s2
    return tl.load(X + offs, mask=mask, other=0.0)


@triton.jit
def load_input(X, rows, cols, row_end, n_cols, T, s0, s1, s2, s3, col0, H, W, W_out,
               KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
               PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
               IM2COL: tl.constexpr, ONES_COL: tl.constexpr):
    """Tile of the layer-input token matrix: rows = b·T + t, cols < n_cols of the group whose
    first column (linear) or channel (conv) is col0; 0 outside; with ONES_COL, column n_cols
    is 1 (the bias). IM2COL: column (c, i, j) of output pixel t = (oh, ow) is
    X[b, col0 + c, oh·SH − PH + i·DH, ow·SW − PW + j·DW] (0 in the padding)."""
    if IM2COL:
        # 32-bit index arithmetic (rows < MAX_ROWS, columns < 2³¹): no 64-bit division.
        r32 = rows.to(tl.int32)
        b32 = r32 // T
        t = r32 - b32 * T
        b = b32.to(tl.int64)
        oh = t // W_out
        ow = t - oh * W_out
        cols32 = cols.to(tl.int32)
        c32 = cols32 // (KH * KW)
        ij = cols32 - c32 * (KH * KW)
        ki = ij // KW
        kj = ij - ki * KW
        c = c32.to(tl.int64)
        cols = cols.to(tl.int64)
        h = oh[:, None] * SH - PH + ki[None, :] * DH
        w = ow[:, None] * SW - PW + kj[None, :] * DW
        mask = ((rows[:, None] < row_end) & (cols[None, :] < n_cols)
                & (h >= 0) & (h < H) & (w >= 0) & (w < W))
        offs = b[:, None] * s0 + (col0 + c)[None, :] * s1 + h * s2 + w * s3
        x = tl.load(X + offs, mask=mask, other=0.0)
    else:
        x = load_rows(X, rows, cols, row_end, n_cols, T, s0, s1, s2, col0)
    if ONES_COL:
        ones = (rows[:, None] < row_end) & (cols[None, :] == n_cols)
        x = tl.where(ones, 1.0, x).to(x.dtype)
    return x


@triton.jit
def _round_tf32(x):
    """x (fp32) rounded to nearest (ties to even) at 11 significant bits: a TF32 value, which
    a TF32 tensor-core operand reads without loss. |x| < 2¹²⁸(1 − 2⁻¹²) (no carry into Inf)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + ((bits >> 13) & 1) + 0xFFF) & -8192  # -8192: the mask 0xFFFFE000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def split_tf32(x):
    """(hi, lo), both exact TF32 values, with |x − hi − lo| ≤ max(2⁻²³|x|, 2⁻¹³⁷): with
    2ᵉ ≤ |x| < 2ᵉ⁺¹, hi = x rounded at 11 bits leaves r = x − hi (exact) with |r| ≤ 2ᵉ⁻¹¹, a
    multiple of 2ᵉ⁻²³ of ≤ 12 bits, and lo = r rounded at 11 bits is off by ≤ 2ᵉ⁻²³ (2 ulp of
    x; fp32 subnormals, rounded on the same 2⁻¹³⁶ grid, by ≤ 2⁻¹³⁷). TF32 has fp32's exponent
    range, so no piece under- or overflows as 16-bit pieces would."""
    hi = _round_tf32(x)
    return hi, _round_tf32(x - hi)


def column_scale(c):
    """Per column of the coefficients c (B, m), the power of two 2^⌈log₂ max|c|⌉ (1 for a zero
    column), contiguous fp32: c / scale has |c| ≤ 1 exactly, and the kernels multiply their
    fp32 result by it in the epilogue (exact)."""
    amax = c.abs().amax(0).float() if c.shape[0] else c.new_zeros(c.shape[1], dtype=torch.float)
    return torch.where(amax > 0, torch.exp2(torch.ceil(torch.log2(amax))), 1.0).contiguous()


MAX_ROWS = 2 ** 31 - 2 ** 16  # token rows B·T (and a tile past them) index in 32 bits


def check_rows(B, T):
    if B * T >= MAX_ROWS:
        raise ValueError(f"B·T = {B * T} token rows: the Triton kernels take fewer than "
                         f"{MAX_ROWS} (32-bit row indices)")


@dataclasses.dataclass(frozen=True)
class Tokens:
    """A layer input as a token matrix: `args` (tensor, 4 strides) and the geometry shared by
    both sides of a cross-Gram (`geometry`: H, W, W_out; `conv`: the constexpr kernel shape)."""
    data: torch.Tensor
    strides: tuple  # 4 element strides (linear: b, t, column, unused)
    B: int
    T: int
    cols: int  # columns of one group (d_in / groups, or C_in/groups · kh · kw)
    col_step: int  # col0 of group g is g · col_step (columns for linear, channels for conv)
    geometry: tuple = (1, 1, 1)  # H, W, W_out
    conv: dict = dataclasses.field(default_factory=lambda: dict(
        KH=1, KW=1, SH=1, SW=1, PH=0, PW=0, DH=1, DW=1, IM2COL=False))

    def __post_init__(self):
        check_rows(self.B, self.T)

    def args(self):
        return (self.data, *self.strides)


def linear_tokens(A, groups=1):
    """A (B, d) or (B, T, d) as a token matrix with d / groups columns per group."""
    A3 = A if A.dim() == 3 else A[:, None]
    d = A3.shape[2] // groups
    return Tokens(A3, (*A3.stride(), 0), A3.shape[0], A3.shape[1], d, d)


def conv2d_tokens(X, kernel_size, stride, padding, dilation, groups, out_hw):
    """X (B, C_in, H, W) read by implicit im2col for output pixels out_hw = (H_out, W_out)."""
    kh, kw = kernel_size
    c_group = X.shape[1] // groups
    conv = dict(KH=kh, KW=kw, SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1],
                DH=dilation[0], DW=dilation[1], IM2COL=True)
    return Tokens(X, tuple(X.stride()), X.shape[0], out_hw[0] * out_hw[1], c_group * kh * kw,
                  c_group, (X.shape[2], X.shape[3], out_hw[1]), conv)


def output_tokens(E):
    """E (B, d), (B, T, d) or a conv output gradient (B, C_out, H_out, W_out) -> (B, T, d) view."""
    if E.dim() == 4:
        return E.flatten(2).transpose(1, 2)
    return E if E.dim() == 3 else E[:, None]


def input_precision(dtype):
    """fp32 operands: full fp32 products unless the user allowed TF32 for matmuls, as torch
    does; fp16/bf16 operands multiply exactly in any case."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def tile(n, largest=128):
    """Tile edge for a dimension of size n: a power of two in [32, largest], no larger than n
    needs (small layers waste no lanes; large ones get tensor-core sized tiles)."""
    return max(32, min(largest, triton.next_power_of_2(max(1, n))))


def num_warps(*edges):
    """8 warps for tiles of 128 × 128 elements or more, else 4."""
    area = 1
    for edge in edges:
        area *= edge
    return 8 if area >= 128 * 128 else 4
