// Per-tile arithmetic of the linear-layer Gram K = (A A^T + b) ⊙ (E E^T), b = 1 with a bias
// column, else 0. Torch-free and __host__ __device__: the CUDA kernel runs the micro-kernel
// per thread on shared-memory panels and the combine per entry; the CPU kernel (whose inner
// products come from the CPU BLAS) runs the same combine; ctest checks every function.
#pragma once
#include "lowrank/hd.h"

namespace lowrank {
namespace core {

// Tile edge of K that one CUDA block / one CPU task owns, and the k-chunk of a panel.
constexpr int kGramTile = 64;
constexpr int kGramChunk = 16;

// acc[r][c] += sum_{k < kc} pi[k * ld + r] * pj[k * ld + c]
// Panels are k-major (one row of `ld` floats per k), so the inner loops run over
// contiguous rows/columns: an outer-product micro-kernel.
template <int MR, int NR>
LK_HD void outer_product_accumulate(const float* pi, const float* pj, int kc, int ld,
                                    float (&acc)[MR][NR]) {
  for (int k = 0; k < kc; ++k) {
    float a[MR];
    float b[NR];
LK_UNROLL
    for (int r = 0; r < MR; ++r) a[r] = pi[k * ld + r];
LK_UNROLL
    for (int c = 0; c < NR; ++c) b[c] = pj[k * ld + c];
LK_UNROLL
    for (int r = 0; r < MR; ++r) {
LK_UNROLL
      for (int c = 0; c < NR; ++c) acc[r][c] += a[r] * b[c];
    }
  }
}

// K_ij from the two inner products: (a_i·a_j + [bias]) * (e_i·e_j).
LK_HD float gram_linear_entry(float aa, float ee, bool bias) {
  return (bias ? aa + 1.0f : aa) * ee;
}

// Number of tiles of edge `tile` covering n rows.
LK_HD index_t tile_count(index_t n, index_t tile) { return (n + tile - 1) / tile; }

}  // namespace core
}  // namespace lowrank
