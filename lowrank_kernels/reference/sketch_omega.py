"""The sketch matrix Ω in pure PyTorch: Philox4x32-10 vectorized in int64 arithmetic.

Ω_ij = f(seed, i, j) (the definition shared with csrc/include/lowrank/philox.h and
lowrank_kernels/triton/philox.py):

    (x0, x1, x2, x3) = Philox4x32-10(key = (lo32(seed), hi32(seed)),
                                     counter = (⌊j/4⌋, lo32(i), hi32(i), 0))
    Gaussian:   word pair (a, b) = (x0, x1) for j mod 4 ∈ {0, 1}, (x2, x3) for j mod 4 ∈ {2, 3};
                Ω_ij = r cos θ (j mod 4 even) or r sin θ (j mod 4 odd), r = √(−2 ln u),
                u = (a + ½)·2⁻³², θ = 2π(b + ½)·2⁻³², in float32 operation by operation:
                ln u = ln_fp32(u) for a < 2³¹, else log1p(−w) = ln_fp32(y)·(−w/(y − 1)),
                w = (~a + ½)·2⁻³², y = 1 − w (−w when y = 1), with ln_fp32 Cephes' logf;
                θ = (o + t)·π/4, octant o = b >> 29, and cos θ, sin θ = ±cos β, ±sin β by
                Cephes' polynomials, β = (f + ½)·2⁻²⁹·π/4, f the low 29 bits of b (of ~b
                in odd octants) — see _box_muller
    Rademacher: Ω_ij = 1 − 2·(x_{j mod 4} >> 31)

Every float32 operation is IEEE-rounded and none is fused, so this module, the C++ header and
Triton's interpreter give the same bits. Entries are independent; Gaussian ones are N(0, 1)
up to the 2⁻³² grid (|Ω_ij| ≤ 6.77), within a few float32 ulps of the float64 formula.
"""
import torch

_MUL = (0xD2511F53, 0xCD9E8D57)
_WEYL = (0x9E3779B9, 0xBB67AE85)
_MASK32 = 0xFFFFFFFF
_F32 = torch.float32
# Float32 constants (exact): 2⁻³², π/4·2⁻²⁹, √½; Cephes logf (P, ln 2 = hi + lo), sinf, cosf.
_TWO_POW_M32 = 2.0 ** -32
_QUARTER_PI_POW_M29 = float.fromhex("0x1.921fb6p-30")
_SQRT_HALF = float.fromhex("0x1.6a09e6p-1")
_LOG_P = [float.fromhex(h) for h in (
    "0x1.204376p-4", "-0x1.d7a370p-4", "0x1.de4a34p-4", "-0x1.fcba9ep-4", "0x1.23d37ep-3",
    "-0x1.555ca0p-3", "0x1.999d58p-3", "-0x1.fffff8p-3", "0x1.555554p-2")]
_LN2_HI, _LN2_LO = 0.693359375, float.fromhex("-0x1.bd0106p-13")
_SIN = [float.fromhex(h) for h in ("-0x1.555546p-3", "0x1.11073cp-7", "-0x1.9943f2p-13")]
_COS = [float.fromhex(h) for h in ("0x1.55554ap-5", "-0x1.6c0c34p-10", "0x1.99eb9cp-16")]

def _mulhilo(a: torch.Tensor, m: int):
    """(hi32, lo32) of the 64-bit product a·m, a and m < 2³², in int64 without overflow."""
    t_lo = (a & 0xFFFF) * m  # < 2⁴⁸
    t_hi = (a >> 16) * m  # < 2⁴⁸
    s = (t_lo >> 16) + t_hi  # a·m = s·2¹⁶ + (t_lo mod 2¹⁶)
    return s >> 16, ((s & 0xFFFF) << 16) | (t_lo & 0xFFFF)


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 of int64 tensors holding uint32 counter words, key (k0, k1)."""
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, _MUL[0])
        hi1, lo1 = _mulhilo(c2, _MUL[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _WEYL[0]) & _MASK32
        k1 = (k1 + _WEYL[1]) & _MASK32
    return c0, c1, c2, c3


def omega_words(rows: torch.Tensor, groups: int, seed: int, first_group: int = 0):
    """The four uint32 words (as int64, shape len(rows) × groups) behind Ω[rows, 4g..4g+3],
    g = first_group .. first_group + groups − 1."""
    rows = rows.to(torch.int64)[:, None]
    g = torch.arange(first_group, first_group + groups, dtype=torch.int64,
                     device=rows.device)[None, :]
    shape = (rows.shape[0], groups)
    c0 = g.expand(shape)
    c1 = (rows & _MASK32).expand(shape)
    c2 = (rows >> 32).expand(shape)
    c3 = torch.zeros(shape, dtype=torch.int64, device=rows.device)
    return philox4x32_10(c0, c1, c2, c3, seed & _MASK32, (seed >> 32) & _MASK32)


def _log_fp32(x):
    """ln x of a float32 tensor of normal x > 0 (Cephes logf; philox.h log_fp32)."""
    bits = x.view(torch.int32)
    m = ((bits & 0x007FFFFF) | 0x3F000000).view(_F32)  # x = m·2^e, m ∈ [½, 1)
    small = m < _SQRT_HALF
    e = ((bits >> 23) - 126 - small.to(torch.int32)).to(_F32)
    f = (m - 1.0) + torch.where(small, m, 0.0)  # m − 1 or 2m − 1, exact
    z = f * f
    p = torch.full_like(f, _LOG_P[0])
    for c in _LOG_P[1:]:
        p = p * f + c
    y = p * f * z
    y = y + e * _LN2_LO
    y = y + -0.5 * z
    return (f + y) + e * _LN2_HI


def _box_muller(a, b):
    """(r cos θ, r sin θ) in float32 of int64 tensors of words a, b (philox.h box_muller)."""
    # r² = −2 ln u
    u = (a.to(_F32) + 0.5) * _TWO_POW_M32
    w = ((_MASK32 - a).to(_F32) + 0.5) * _TWO_POW_M32  # ~a
    y = 1.0 - w
    lower, one = a < 0x80000000, y == 1.0
    log_x = _log_fp32(torch.where(lower, u, y))
    log1p = log_x * (-w / torch.where(one, 1.0, y - 1.0))
    r2 = -2.0 * torch.where(lower, log_x, torch.where(one, -w, log1p))
    # correctly rounded sqrtf (torch's float32 sqrt on CPU is not: it is off by an ulp at
    # times); the float64 root rounded to float32 is, for float32 arguments
    r = torch.sqrt(r2.double()).to(_F32)
    # cos θ, sin θ by octant
    o = b >> 29
    f = torch.where((o & 1) == 1, _MASK32 - b, b) & 0x1FFFFFFF
    beta = (f.to(_F32) + 0.5) * _QUARTER_PI_POW_M29
    z = beta * beta
    s = beta + beta * z * (_SIN[0] + z * (_SIN[1] + z * _SIN[2]))
    c = 1.0 - 0.5 * z + z * z * (_COS[0] + z * (_COS[1] + z * _COS[2]))
    swap = ((o + 1) >> 1) & 1 == 1
    cos_t, sin_t = torch.where(swap, s, c), torch.where(swap, c, s)
    cos_t = torch.where(((o + 2) >> 2) & 1 == 1, -cos_t, cos_t)
    sin_t = torch.where(o >= 4, -sin_t, sin_t)
    return r * cos_t, r * sin_t


def sketch_omega(rows: torch.Tensor, k: int, seed: int, rademacher: bool = False,
                 col_offset: int = 0) -> torch.Tensor:
    """Ω[rows, col_offset : col_offset + k] as float32 (len(rows) × k); rows: 1-D int64 row
    indices ≥ 0; col_offset a multiple of 4."""
    groups = (k + 3) // 4
    x = omega_words(rows, groups, seed, col_offset // 4)
    if rademacher:
        z = [1.0 - 2.0 * (w >> 31).float() for w in x]
    else:
        z = [*_box_muller(x[0], x[1]), *_box_muller(x[2], x[3])]
    # column 4g + q holds z[q][:, g]
    return torch.stack(z, dim=2).reshape(rows.shape[0], 4 * groups)[:, :k].contiguous()
