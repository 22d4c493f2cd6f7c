"""The sketch matrix Ω in pure PyTorch: Philox4x32-10 vectorized in int64 arithmetic.

Ω_ij = f(seed, i, j) (the definition shared with csrc/include/lowrank/philox.h and
lowrank_kernels/triton/philox.py):

    (x0, x1, x2, x3) = Philox4x32-10(key = (lo32(seed), hi32(seed)),
                                     counter = (⌊j/4⌋, lo32(i), hi32(i), 0))
    Gaussian:   word pair (x0, x1) for j mod 4 ∈ {0, 1}, (x2, x3) for j mod 4 ∈ {2, 3}:
                u = (x_a + ½)·2⁻³², v = (x_b + ½)·2⁻³², r = √(−2 ln u), θ = 2πv in float64,
                Ω_ij = fp32(r cos θ) (j mod 4 even) or fp32(r sin θ) (j mod 4 odd)
    Rademacher: Ω_ij = 1 − 2·(x_{j mod 4} >> 31)

Entries are independent; Gaussian ones are N(0, 1) up to the 2⁻³² grid (|Ω_ij| ≤ 6.66).
"""
import torch

_MUL = (0xD2511F53, 0xCD9E8D57)
_WEYL = (0x9E3779B9, 0xBB67AE85)
_MASK32 = 0xFFFFFFFF
_TWO_PI = 6.283185307179586


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


def _box_muller(a, b):
    u = (a.double() + 0.5) * 2.0 ** -32
    v = (b.double() + 0.5) * 2.0 ** -32
    r = torch.sqrt(-2.0 * torch.log(u))
    theta = _TWO_PI * v
    return (r * torch.cos(theta)).float(), (r * torch.sin(theta)).float()


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
