"""Ω tiles generated in registers: the Triton implementation of Ω_ij = f(seed, i, j) (the
definition is in lowrank_kernels/reference/sketch_omega.py and csrc/include/lowrank/philox.h).

tl.philox(seed, c0, c1, c2, c3) is Philox4x32-10 with key (lo32(seed), hi32(seed)). The
Box–Muller transform of the words is the float32 one of philox.h, operation by operation
(no float64 instruction):
    −2 ln u: u = (a + ½)·2⁻³² directly for a < 2³¹ (|ln u| ≥ ln 2: no cancellation); for
             a ≥ 2³¹, w = 1 − u = (~a + ½)·2⁻³² exactly and ln u = log1p(−w) (Goldberg:
             ln(1 − w)·(−w)/((1 − w) − 1)); ln by Cephes' logf (_log_fp32), not tl.log, so
             that the result does not depend on the math library;
    θ = 2π(b + ½)·2⁻³² = (o + t)·π/4 with octant o = b >> 29: cos θ and sin θ are ± cos β,
             ± sin β of β = (f + ½)·2⁻²⁹·π/4 ∈ (0, π/4], f the low 29 bits of b (of ~b in odd
             octants), so there is no cancellation near the zeros of cos and sin.
The interpreter (numpy float32) gives the reference's bits. Compiled, Triton fuses a·b + c
into FMAs (enable_fp_fusion), which moves an entry by about an ulp now and then.
"""
import triton
import triton.language as tl

_TWO_POW_M32 = tl.constexpr(2.3283064365386963e-10)
_QUARTER_PI_POW_M29 = tl.constexpr(1.4629180792671596e-09)  # π/4 · 2⁻²⁹


@triton.jit
def _log_fp32(x):
    """ln x of float32 normal x > 0: Cephes logf, the operations of philox.h log_fp32."""
    bits = x.to(tl.int32, bitcast=True)
    m = ((bits & 0x007FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)  # x = m·2^e
    small = m < 0.70710677
    e = ((bits >> 23) - 126 - small.to(tl.int32)).to(tl.float32)
    f = (m - 1.0) + tl.where(small, m, 0.0)  # m − 1 or 2m − 1, exact
    z = f * f
    p = f * 7.0376836292e-2 + -1.1514610310e-1
    p = p * f + 1.1676998740e-1
    p = p * f + -1.2420140846e-1
    p = p * f + 1.4249322787e-1
    p = p * f + -1.6668057665e-1
    p = p * f + 2.0000714765e-1
    p = p * f + -2.4999993993e-1
    p = p * f + 3.3333331174e-1
    y = p * f * z
    y = y + e * -2.12194440e-4
    y = y + -0.5 * z
    return (f + y) + e * 0.693359375


@triton.jit
def _box_muller_fp32(a, b):
    """(r cos θ, r sin θ) in float32 of the words a (radius) and b (angle); see above."""
    # r² = −2 ln u: one logarithm, of u or of y.
    u = (a.to(tl.float32) + 0.5) * _TWO_POW_M32
    w = ((~a).to(tl.float32) + 0.5) * _TWO_POW_M32
    y = 1.0 - w
    lower = a < 0x80000000
    one = y == 1.0
    log_x = _log_fp32(tl.where(lower, u, y))
    log1p = log_x * (-w / tl.where(one, 1.0, y - 1.0))
    r = tl.sqrt_rn(-2.0 * tl.where(lower, log_x, tl.where(one, -w, log1p)))
    # θ by octant.
    octant = (b >> 29).to(tl.int32)
    odd = (octant & 1) == 1
    low = tl.where(odd, ~b, b) & 0x1FFFFFFF
    beta = (low.to(tl.float32) + 0.5) * _QUARTER_PI_POW_M29
    # Cephes sinf/cosf minimax polynomials on [0, π/4] (≈ 1 ulp): no range reduction, so no
    # libdevice large-argument path (which holds float64 instructions).
    z = beta * beta
    s = beta + beta * z * (-1.6666654611e-1 + z * (8.3321608736e-3 + z * -1.9515295891e-4))
    c = 1.0 - 0.5 * z + z * z * (4.166664568298827e-2 + z * (-1.388731625493765e-3
                                                             + z * 2.443315711809948e-5))
    swap = ((octant + 1) >> 1) & 1 == 1
    cos_t = tl.where(swap, s, c)
    sin_t = tl.where(swap, c, s)
    cos_t = tl.where(((octant + 2) >> 2) & 1 == 1, -cos_t, cos_t)
    sin_t = tl.where(octant >= 4, -sin_t, sin_t)
    return r * cos_t, r * sin_t


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
        z0, z1 = _box_muller_fp32(x0, x1)
        z2, z3 = _box_muller_fp32(x2, x3)
    # [r, g, a, b] = z_{2a+b}; reshaped, column 4g + 2a + b.
    tile = tl.join(tl.join(z0, z2), tl.join(z1, z3))
    return tl.reshape(tile, (rows.shape[0], 4 * groups.shape[0]))
