"""Ω tiles generated in registers: the Triton implementation of Ω_ij = f(seed, i, j) (the
definition is in lowrank_kernels/reference/sketch_omega.py and csrc/include/lowrank/philox.h).

tl.philox(seed, c0, c1, c2, c3) is Philox4x32-10 with key (lo32(seed), hi32(seed)); the
uint → float conversion and Box–Muller are done here, in float64, so that they match the
C++ and PyTorch implementations (float64 log/cos/sin agree to an ulp of float64, hence the
float32 entries agree bit for bit except in the rare double-rounding case: at most 1 ulp).
The float64 transform runs at the full float64 rate of data-center GPUs (A100/H100: half the
float32 rate); on GPUs with slow float64 it makes the generation, not the GEMM, the cost.
"""
import triton
import triton.language as tl

_TWO_PI = tl.constexpr(6.283185307179586)
_TWO_POW_M32 = tl.constexpr(2.3283064365386963e-10)


@triton.jit
def _box_muller(a, b):
    u = (a.to(tl.float64) + 0.5) * _TWO_POW_M32
    v = (b.to(tl.float64) + 0.5) * _TWO_POW_M32
    r = tl.sqrt(-2.0 * tl.log(u))  # float64 sqrt is correctly rounded
    theta = _TWO_PI * v
    return (r * tl.cos(theta)).to(tl.float32), (r * tl.sin(theta)).to(tl.float32)


@triton.jit
def _sign(x):
    return 1.0 - 2.0 * (x >> 31).to(tl.float32)


@triton.jit
def omega_tile(seed, rows, groups, RADEMACHER: tl.constexpr):
    """Ω[rows, 4·groups + q] as a (len(rows), 4·len(groups)) float32 tile, column 4g + q of
    group g. rows: int64 row indices; groups: int32 column-group indices ⌊j/4⌋."""
    i = rows[:, None]
    c0 = (groups[None, :] + 0 * i).to(tl.uint32)
    c1 = (i & 0xFFFFFFFF).to(tl.uint32) + 0 * c0
    c2 = (i >> 32).to(tl.uint32) + 0 * c0
    c3 = 0 * c0
    x0, x1, x2, x3 = tl.philox(seed, c0, c1, c2, c3)
    if RADEMACHER:
        z0, z1, z2, z3 = _sign(x0), _sign(x1), _sign(x2), _sign(x3)
    else:
        z0, z1 = _box_muller(x0, x1)
        z2, z3 = _box_muller(x2, x3)
    # [r, g, a, b] = z_{2a+b}; reshaped, column 4g + 2a + b.
    tile = tl.join(tl.join(z0, z2), tl.join(z1, z3))
    return tl.reshape(tile, (rows.shape[0], 4 * groups.shape[0]))
