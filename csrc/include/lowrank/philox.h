// The sketch matrix Ω of lowrank_kernels, entry by entry from a counter-based RNG, so that
// Ω is never stored and is the same on every device and backend. Torch-free, host+device:
// the CPU kernel (csrc/sketch_omega.cpp) runs it, ctest checks it against the Random123
// known-answer vectors, and the Triton kernels and the PyTorch reference implement the same
// definition (lowrank_kernels/triton/philox.py, lowrank_kernels/reference/sketch_omega.py):
//
//   (x0, x1, x2, x3) = Philox4x32-10(key = (lo32(seed), hi32(seed)),
//                                    counter = (floor(j / 4), lo32(i), hi32(i), 0))
//   Gaussian:    pair 0 = (x0, x1) for j mod 4 in {0, 1}, pair 1 = (x2, x3) for {2, 3};
//                Ω_ij = r cos θ (even j mod 4), r sin θ (odd j mod 4) of the pair (a, b):
//                box_muller below, all in float32: r = sqrt(-2 ln u), u = (a + 1/2) 2^-32,
//                θ = 2π (b + 1/2) 2^-32, with ln by log_fp32 (Cephes) and cos/sin by
//                octant + Cephes polynomials, each operation in a fixed order, so that the
//                reference and Triton (same operations) give the same bits
//   Rademacher:  Ω_ij = 1 - 2 * (x_{j mod 4} >> 31)   (±1)
//
// seed in [0, 2^63), i (row) in [0, 2^63), j (column) in [0, 2^34).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "lowrank/hd.h"

namespace lowrank {
namespace philox {

constexpr std::uint32_t kMul0 = 0xD2511F53u;  // Random123 PHILOX_M4x32_0
constexpr std::uint32_t kMul1 = 0xCD9E8D57u;  // PHILOX_M4x32_1
constexpr std::uint32_t kWeyl0 = 0x9E3779B9u;  // PHILOX_W32_0 (golden ratio)
constexpr std::uint32_t kWeyl1 = 0xBB67AE85u;  // PHILOX_W32_1 (sqrt(3) - 1)

struct Block4 {
  std::uint32_t x[4];
};

// One Philox round: (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0)).
LK_HD Block4 philox_round(const Block4& c, std::uint32_t k0, std::uint32_t k1) {
  const std::uint64_t p0 = static_cast<std::uint64_t>(kMul0) * c.x[0];
  const std::uint64_t p1 = static_cast<std::uint64_t>(kMul1) * c.x[2];
  Block4 out;
  out.x[0] = static_cast<std::uint32_t>(p1 >> 32) ^ c.x[1] ^ k0;
  out.x[1] = static_cast<std::uint32_t>(p1);
  out.x[2] = static_cast<std::uint32_t>(p0 >> 32) ^ c.x[3] ^ k1;
  out.x[3] = static_cast<std::uint32_t>(p0);
  return out;
}

// Philox4x32-10 (Salmon et al., SC'11): 10 rounds, the key bumped by the Weyl constants
// between rounds.
LK_HD Block4 philox4x32_10(Block4 counter, std::uint32_t k0, std::uint32_t k1) {
LK_UNROLL
  for (int r = 0; r < 10; ++r) {
    counter = philox_round(counter, k0, k1);
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return counter;
}

// The four uint32 words behind Ω[i, 4g .. 4g+3].
LK_HD Block4 omega_words(std::uint64_t seed, std::uint64_t i, std::uint64_t g) {
  Block4 counter{{static_cast<std::uint32_t>(g), static_cast<std::uint32_t>(i),
                  static_cast<std::uint32_t>(i >> 32), 0u}};
  return philox4x32_10(counter, static_cast<std::uint32_t>(seed),
                       static_cast<std::uint32_t>(seed >> 32));
}

// The bits of a float32 and back (exact).
LK_HD std::uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  std::uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
#endif
}

LK_HD float bits_float(std::uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
#endif
}

// c ? a : b. On the host by bit masks, so that the compiler keeps both operands' arithmetic
// unconditional (with a ?: it sinks it into branches, which -ftrapping-math then keeps from
// becoming vector selects).
LK_HD float select(bool c, float a, float b) {
#if defined(__CUDA_ARCH__)
  return c ? a : b;
#else
  const std::uint32_t mask = 0u - static_cast<std::uint32_t>(c);
  return bits_float((float_bits(a) & mask) | (float_bits(b) & ~mask));
#endif
}

// ln x in float32 for a normal x > 0 (Cephes logf, about 1 ulp): x = m 2^e, f = m - 1 (or
// 2m - 1 below m = sqrt(1/2), exact), ln x = f - f^2/2 + f^3 P(f) + e ln 2 with ln 2 split in
// two. Only float32 +, *, compares and bit operations in a fixed order, so that every IEEE
// implementation (this one, the PyTorch reference, Triton) rounds the same way: no FMA
// contraction (x86-64 without -mfma: none; elsewhere build with -ffp-contract=off).
LK_HD float log_fp32(float x) {
  const std::uint32_t bits = float_bits(x);
  const float m = bits_float((bits & 0x007FFFFFu) | 0x3F000000u);  // [1/2, 1)
  const bool small = m < 0x1.6a09e6p-1f;                            // sqrt(1/2)
  const float e = static_cast<float>(static_cast<std::int32_t>(bits >> 23) - 126 -
                                     static_cast<std::int32_t>(small));
  const float f = (m - 1.0f) + select(small, m, 0.0f);  // m - 1 or 2m - 1, both exact
  const float z = f * f;
  float p = 0x1.204376p-4f;
  p = p * f + -0x1.d7a370p-4f;
  p = p * f + 0x1.de4a34p-4f;
  p = p * f + -0x1.fcba9ep-4f;
  p = p * f + 0x1.23d37ep-3f;
  p = p * f + -0x1.555ca0p-3f;
  p = p * f + 0x1.999d58p-3f;
  p = p * f + -0x1.fffff8p-3f;
  p = p * f + 0x1.555554p-2f;
  float y = p * f * z;
  y = y + e * -0x1.bd0106p-13f;  // ln 2 - 0.693359375
  y = y + -0.5f * z;
  return (f + y) + e * 0.693359375f;
}

// Box–Muller in float32 of one word pair (a, b): (r cos θ, r sin θ), r = sqrt(-2 ln u),
// u = (a + 1/2) 2^-32, θ = 2π (b + 1/2) 2^-32, in three branch-free steps (every operation
// unconditional, the results selected, so that a loop over pairs vectorizes):
//   -2 ln u   (radius_squared) ln u = log_fp32(u) for a < 2^31 (u <= 1/2: no cancellation);
//             for a >= 2^31, w = 1 - u = (~a + 1/2) 2^-32 exactly and ln u = log1p(-w) =
//             log_fp32(y) (-w / (y - 1)), y = 1 - w (Goldberg; -w when y == 1);
//   r         correctly rounded sqrtf;
//   cos, sin  (cos_sin) θ = (o + t) π/4 with octant o = b >> 29: cos θ, sin θ are ± cos β,
//             ± sin β of β = (f + 1/2) 2^-29 π/4 in (0, π/4], f the low 29 bits of b (of ~b
//             in odd octants), by the Cephes sinf/cosf polynomials in z = β^2 (no range
//             reduction).
LK_HD float radius_squared(std::uint32_t a) {
  // u is used for a < 2^31, w for ~a < 2^31: the one used converts exactly as an int32 (one
  // vector instruction on x86, where uint32 -> float takes several); the other is not used.
  const float u = (static_cast<float>(static_cast<std::int32_t>(a)) + 0.5f) * 0x1p-32f;
  const float w = (static_cast<float>(static_cast<std::int32_t>(~a)) + 0.5f) * 0x1p-32f;
  const float y = 1.0f - w;
  const bool lower = a < 0x80000000u, one = y == 1.0f;
  const float log_x = log_fp32(select(lower, u, y));  // one logarithm: the one used
  const float neg_w = -w;
  const float log1p = log_x * (neg_w / select(one, 1.0f, y - 1.0f));
  return -2.0f * select(lower, log_x, select(one, neg_w, log1p));
}

LK_HD void cos_sin(std::uint32_t b, float& cos_theta, float& sin_theta) {
  const std::uint32_t o = b >> 29;
  const std::uint32_t f = ((o & 1u) ? ~b : b) & 0x1FFFFFFFu;
  const float beta = (static_cast<float>(f) + 0.5f) * 0x1.921fb6p-30f;  // π/4 2^-29
  const float z = beta * beta;
  const float s = beta + beta * z * (-0x1.555546p-3f + z * (0x1.11073cp-7f + z * -0x1.9943f2p-13f));
  const float c = 1.0f - 0.5f * z +
                  z * z * (0x1.55554ap-5f + z * (-0x1.6c0c34p-10f + z * 0x1.99eb9cp-16f));
  const bool swap = ((o + 1u) >> 1) & 1u;
  const float cos_t = swap ? s : c, sin_t = swap ? c : s;
  const float neg_cos = -cos_t, neg_sin = -sin_t;
  cos_theta = (((o + 2u) >> 2) & 1u) ? neg_cos : cos_t;
  sin_theta = o >= 4u ? neg_sin : sin_t;
}

LK_HD void box_muller(std::uint32_t a, std::uint32_t b, float& z_cos, float& z_sin) {
  const float r = std::sqrt(radius_squared(a));
  float c, s;
  cos_sin(b, c, s);
  z_cos = r * c;
  z_sin = r * s;
}

// out[q] = Ω[i, 4g + q], q = 0..3 (Gaussian, or ±1 when rademacher).
LK_HD void omega_group(std::uint64_t seed, std::uint64_t i, std::uint64_t g, bool rademacher,
                       float out[4]) {
  const Block4 w = omega_words(seed, i, g);
  if (rademacher) {
LK_UNROLL
    for (int q = 0; q < 4; ++q) out[q] = 1.0f - 2.0f * static_cast<float>(w.x[q] >> 31);
    return;
  }
  box_muller(w.x[0], w.x[1], out[0], out[1]);
  box_muller(w.x[2], w.x[3], out[2], out[3]);
}

// Ω[i, j] alone.
LK_HD float omega_entry(std::uint64_t seed, std::uint64_t i, std::uint64_t j, bool rademacher) {
  float group[4];
  omega_group(seed, i, j / 4, rademacher, group);
  return group[j % 4];
}

}  // namespace philox
}  // namespace lowrank
