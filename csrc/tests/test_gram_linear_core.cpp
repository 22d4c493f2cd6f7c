// ctest of the host/device core of gram_linear (torch-free): the outer-product micro-kernel
// against a double-precision loop, the bias combine, and tile counting.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "lowrank/gram_linear_core.h"
#include "expect.h"

using lowrank::core::gram_linear_entry;
using lowrank::core::outer_product_accumulate;
using lowrank::core::tile_count;


template <int MR, int NR>
void check_outer_product(int kc, int ld, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> pi(kc * ld), pj(kc * ld);
  for (auto& x : pi) x = normal(rng);
  for (auto& x : pj) x = normal(rng);
  float acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) acc[r][c] = static_cast<float>(r - c);  // accumulates onto
  outer_product_accumulate<MR, NR>(pi.data(), pj.data(), kc, ld, acc);
  for (int r = 0; r < MR; ++r) {
    for (int c = 0; c < NR; ++c) {
      double exact = r - c, magnitude = std::fabs(static_cast<double>(r - c));
      for (int k = 0; k < kc; ++k) {
        exact += static_cast<double>(pi[k * ld + r]) * pj[k * ld + c];
        magnitude += std::fabs(static_cast<double>(pi[k * ld + r]) * pj[k * ld + c]);
      }
      const double bound = (kc + 1) * std::ldexp(1.0, -24) * magnitude;  // gamma_{kc+1}
      EXPECT(std::fabs(acc[r][c] - exact) <= bound, "MR=%d NR=%d kc=%d (%d,%d): %g vs %g", MR,
             NR, kc, r, c, acc[r][c], exact);
    }
  }
}

int main() {
  check_outer_product<4, 4>(16, 64, 1);
  check_outer_product<8, 8>(128, 64, 2);
  check_outer_product<4, 4>(1, 4, 3);
  check_outer_product<8, 8>(7, 13, 4);
  EXPECT(gram_linear_entry(2.0f, 3.0f, false) == 6.0f, "no bias");
  EXPECT(gram_linear_entry(2.0f, 3.0f, true) == 9.0f, "bias adds 1 to the input product");
  EXPECT(tile_count(1, 64) == 1 && tile_count(64, 64) == 1 && tile_count(65, 64) == 2,
         "tile_count");
  EXPECT(tile_count(int64_t{1} << 33, 64) == (int64_t{1} << 27), "tile_count is 64-bit");
  if (failures == 0) std::printf("gram_linear core: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
