// The sketch matrix Ω of lowrank_kernels, entry by entry from a counter-based RNG, so that
// Ω is never stored and is the same on every device and backend. Torch-free, host+device:
// the CPU kernel (csrc/cpu/sketch_omega.cpp) runs it, ctest checks it against the Random123
// known-answer vectors, and the Triton kernels and the PyTorch reference implement the same
// definition (lowrank_kernels/triton/philox.py, lowrank_kernels/reference/sketch_omega.py):
//
//   (x0, x1, x2, x3) = Philox4x32-10(key = (lo32(seed), hi32(seed)),
//                                    counter = (floor(j / 4), lo32(i), hi32(i), 0))
//   Gaussian:    u = (x0 + 1/2) 2^-32,  v = (x1 + 1/2) 2^-32   (pair 0: j mod 4 in {0, 1})
//                u = (x2 + 1/2) 2^-32,  v = (x3 + 1/2) 2^-32   (pair 1: j mod 4 in {2, 3})
//                r = sqrt(-2 ln u), θ = 2π v  (all in IEEE double),
//                Ω_ij = float32(r cos θ) for even j mod 4, float32(r sin θ) for odd j mod 4
//   Rademacher:  Ω_ij = 1 - 2 * (x_{j mod 4} >> 31)   (±1)
//
// seed in [0, 2^63), i (row) in [0, 2^63), j (column) in [0, 2^34).
#pragma once
#include <cmath>
#include <cstdint>

#include "lowrank/hd.h"

namespace lowrank {
namespace philox {

constexpr std::uint32_t kMul0 = 0xD2511F53u;  // Random123 PHILOX_M4x32_0
constexpr std::uint32_t kMul1 = 0xCD9E8D57u;  // PHILOX_M4x32_1
constexpr std::uint32_t kWeyl0 = 0x9E3779B9u;  // PHILOX_W32_0 (golden ratio)
constexpr std::uint32_t kWeyl1 = 0xBB67AE85u;  // PHILOX_W32_1 (sqrt(3) - 1)
constexpr double kTwoPi = 6.283185307179586;   // the double nearest 2π
constexpr double kTwoPow32Inv = 2.3283064365386963e-10;  // 2^-32, exact

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

// Box–Muller in double of one word pair: (r cos θ, r sin θ) rounded to float32.
LK_HD void box_muller(std::uint32_t a, std::uint32_t b, float& z_cos, float& z_sin) {
  const double u = (static_cast<double>(a) + 0.5) * kTwoPow32Inv;
  const double v = (static_cast<double>(b) + 0.5) * kTwoPow32Inv;
  const double r = sqrt(-2.0 * log(u));
  const double theta = kTwoPi * v;
  z_cos = static_cast<float>(r * cos(theta));
  z_sin = static_cast<float>(r * sin(theta));
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
