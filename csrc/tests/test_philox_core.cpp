// ctest of lowrank/philox.h (torch-free): Philox4x32-10 against the known-answer vectors of
// Random123 (kat_vectors, Salmon et al. SC'11), then the Ω definition: word/column mapping,
// Rademacher signs, the float32 Box–Muller at pinned edge words (shared with the PyTorch
// reference's test) and its logarithm, and the moments of the Gaussian entries.
#include <cmath>
#include <cstdint>
#include <cstdio>

#include "lowrank/philox.h"
#include "expect.h"

using lowrank::philox::Block4;
using lowrank::philox::box_muller;
using lowrank::philox::omega_entry;
using lowrank::philox::omega_group;
using lowrank::philox::omega_words;
using lowrank::philox::philox4x32_10;


static void check_kat(Block4 counter, std::uint32_t k0, std::uint32_t k1, Block4 expected) {
  const Block4 got = philox4x32_10(counter, k0, k1);
  for (int q = 0; q < 4; ++q)
    EXPECT(got.x[q] == expected.x[q], "philox4x32_10 word %d: got %08x, expected %08x", q,
           got.x[q], expected.x[q]);
}

int main() {
  // Random123 kat_vectors, philox4x32 with 10 rounds.
  check_kat({{0u, 0u, 0u, 0u}}, 0u, 0u, {{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}});
  check_kat({{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}}, 0xffffffffu, 0xffffffffu,
            {{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}});
  check_kat({{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}}, 0xa4093822u, 0x299f31d0u,
            {{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}});

  // Counter layout: (j / 4, lo32(i), hi32(i), 0), key (lo32(seed), hi32(seed)).
  const std::uint64_t seed = 0x123456789abcdefull, i = 0x500000007ull;
  const Block4 w = omega_words(seed, i, 3);
  const Block4 direct = philox4x32_10({{3u, 7u, 5u, 0u}}, 0x89abcdefu, 0x01234567u);
  for (int q = 0; q < 4; ++q) EXPECT(w.x[q] == direct.x[q], "omega_words word %d", q);

  // Rademacher: the sign bit of word j mod 4.
  for (int j = 0; j < 8; ++j) {
    const float r = omega_entry(seed, i, j, true);
    const Block4 wj = omega_words(seed, i, j / 4);
    EXPECT(r == ((wj.x[j % 4] >> 31) ? -1.0f : 1.0f), "rademacher entry %d is %g", j, r);
  }

  // Gaussian: columns 4g..4g+3 are one Philox call; entries match omega_group, which is
  // box_muller of words (x0, x1) and (x2, x3).
  float group[4];
  omega_group(seed, i, 2, false, group);
  for (int q = 0; q < 4; ++q)
    EXPECT(omega_entry(seed, i, 8 + q, false) == group[q], "omega_entry column %d", 8 + q);
  const Block4 w2 = omega_words(seed, i, 2);
  float z0, z1, z2, z3;
  box_muller(w2.x[0], w2.x[1], z0, z1);
  box_muller(w2.x[2], w2.x[3], z2, z3);
  EXPECT(group[0] == z0 && group[1] == z1 && group[2] == z2 && group[3] == z3, "pairs");

  // The float32 Box–Muller at the edge words, bit for bit the values of the PyTorch
  // reference (python_tests/test_sketch_omega.py pins the same ones), and within a few
  // float32 ulps (absolute 3e-7 here) of the float64 formula.
  struct Pin {
    std::uint32_t a, b;
    float z_cos, z_sin;
  };
  const Pin pins[] = {
      {0x0u, 0x0u, 0x1.b0e08ep+2f, 0x1.53fb1ep-28f},
      {0x0u, 0x7fffffffu, -0x1.b0e08ep+2f, 0x1.53fb1ep-28f},
      {0x0u, 0x80000000u, -0x1.b0e08ep+2f, -0x1.53fb1ep-28f},
      {0x0u, 0xffffffffu, 0x1.b0e08ep+2f, -0x1.53fb1ep-28f},
      {0x7fffffffu, 0x0u, 0x1.2d6abep+0f, 0x1.d976f4p-31f},
      {0x7fffffffu, 0x7fffffffu, -0x1.2d6abep+0f, 0x1.d976f4p-31f},
      {0x7fffffffu, 0x80000000u, -0x1.2d6abep+0f, -0x1.d976f4p-31f},
      {0x7fffffffu, 0xffffffffu, 0x1.2d6abep+0f, -0x1.d976f4p-31f},
      {0x80000000u, 0x0u, 0x1.2d6abep+0f, 0x1.d976f4p-31f},
      {0x80000000u, 0x7fffffffu, -0x1.2d6abep+0f, 0x1.d976f4p-31f},
      {0x80000000u, 0x80000000u, -0x1.2d6abep+0f, -0x1.d976f4p-31f},
      {0x80000000u, 0xffffffffu, 0x1.2d6abep+0f, -0x1.d976f4p-31f},
      {0xffffffffu, 0x0u, 0x1.000000p-16f, 0x1.921fb6p-47f},
      {0xffffffffu, 0x7fffffffu, -0x1.000000p-16f, 0x1.921fb6p-47f},
      {0xffffffffu, 0x80000000u, -0x1.000000p-16f, -0x1.921fb6p-47f},
      {0xffffffffu, 0xffffffffu, 0x1.000000p-16f, -0x1.921fb6p-47f},
  };
  for (const Pin& p : pins) {
    float c, s;
    box_muller(p.a, p.b, c, s);
    EXPECT(c == p.z_cos && s == p.z_sin, "box_muller(%08x, %08x) = (%a, %a), pinned (%a, %a)",
           p.a, p.b, c, s, p.z_cos, p.z_sin);
    const double u = (p.a + 0.5) * std::ldexp(1.0, -32), v = (p.b + 0.5) * std::ldexp(1.0, -32);
    const double r = std::sqrt(-2.0 * std::log(u)), theta = 6.283185307179586 * v;
    EXPECT(std::fabs(c - r * std::cos(theta)) < 3e-7 && std::fabs(s - r * std::sin(theta)) < 3e-7,
           "box_muller(%08x, %08x) vs float64", p.a, p.b);
  }
  // log_fp32 against ln over [2^-33, 1] (every binade), within 2 float32 ulps.
  for (int e = -33; e <= 0; ++e)
    for (int t = 0; t < 4096; ++t) {
      const float x = std::ldexp(1.0f + t / 4096.0f, e - 1);
      if (x > 1.0f) continue;
      const double ln = std::log(static_cast<double>(x));
      const double err = std::fabs(lowrank::philox::log_fp32(x) - ln);
      EXPECT(err <= 2 * std::ldexp(1.0, std::ilogb(ln) - 23) || ln == 0.0,
             "log_fp32(%a): error %g", x, err);
    }

  // Moments over 400k entries: mean 0, variance 1, fourth moment 3 (standard errors
  // 1.6e-3, 2.2e-3, 1.6e-2 — bounds at about 5 standard errors).
  double s1 = 0, s2 = 0, s4 = 0;
  const int rows = 1000, cols = 400;
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < cols; ++j) {
      const double z = omega_entry(7, r, j, false);
      s1 += z;
      s2 += z * z;
      s4 += z * z * z * z;
    }
  const double n = static_cast<double>(rows) * cols;
  EXPECT(std::fabs(s1 / n) < 8e-3, "mean %g", s1 / n);
  EXPECT(std::fabs(s2 / n - 1.0) < 1.1e-2, "variance %g", s2 / n);
  EXPECT(std::fabs(s4 / n - 3.0) < 8e-2, "fourth moment %g", s4 / n);

  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("philox core: all checks passed\n");
  return 0;
}
