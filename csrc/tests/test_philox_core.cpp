// ctest of lowrank/philox.h (torch-free): Philox4x32-10 against the known-answer vectors of
// Random123 (kat_vectors, Salmon et al. SC'11), then the Ω definition: word/column mapping,
// Rademacher signs, and the moments of the Gaussian entries.
#include <cmath>
#include <cstdint>
#include <cstdio>

#include "lowrank/philox.h"
#include "expect.h"

using lowrank::philox::Block4;
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

  // Gaussian: columns 4g..4g+3 are one Philox call; entries match omega_group, and Box–Muller
  // of words (x0, x1) in double.
  float group[4];
  omega_group(seed, i, 2, false, group);
  for (int q = 0; q < 4; ++q)
    EXPECT(omega_entry(seed, i, 8 + q, false) == group[q], "omega_entry column %d", 8 + q);
  const Block4 w2 = omega_words(seed, i, 2);
  const double u = (w2.x[0] + 0.5) * std::ldexp(1.0, -32), v = (w2.x[1] + 0.5) * std::ldexp(1.0, -32);
  const double z0 = std::sqrt(-2.0 * std::log(u)) * std::cos(6.283185307179586 * v);
  EXPECT(group[0] == static_cast<float>(z0), "Box-Muller: %g vs %g", group[0], z0);

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
