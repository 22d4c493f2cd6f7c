// The scaled-rows product of a linear layer's weighted sum for a few rows (float32, AVX2 + FMA
// at run time; callers check tiles::has_avx2_fma() and keep the BLAS route otherwise):
//
//   W[j, o, :] = Σ_r s_r a_r,   s_r = fl(c[r / T, j] · e[r, o]),   r < R = B·T rows
//
// the product (C ⊙ E)ᵀ A of the scaled route with the scaling fused: the R coefficients of
// four rows of W at a time go to a small buffer, then a 4 × 24 tile of W is held in 12 ymm
// registers over the R rows (three 8-float loads of a_r, four broadcasts per r); each entry of
// W is written once. Sums run over r in index order with FMA on the rounded s_r: exact as the
// GEMM on the scaled rows. For R ≤ kScaledRowsMax, where a BLAS GEMM with inner dimension R is
// far from its peak (measured at B = 16, T = 1, 256 -> 256, m = 4, 1 thread: 1.2x faster than
// the scaling pass + MKL's sgemm into W).
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "lowrank/f32_tiles.h"

namespace lowrank::tiles {

// Rows R = B·T up to which the scaled route runs scaled_rows_gemm.
constexpr int64_t kScaledRowsMax = 64;

#ifdef LK_TILES_AVX2
// W[r0 + q, c] = Σ_r s[q·R + r] a[r·lda + c] for q < MR and the columns c of [c0, c0 + 8·V)
// (V vectors of 8; Masked: the last vector's lanes j < nr only).
template <int MR, int V, bool Masked>
LK_TILES_TARGET inline void scaled_tile(const float* s, int64_t R, const float* a, int64_t lda,
                                        float* w, int64_t ldw, __m256i mask) {
  __m256 acc[MR][V];
#pragma GCC unroll 4
  for (int q = 0; q < MR; ++q)
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) acc[q][v] = _mm256_setzero_ps();
  for (int64_t r = 0; r < R; ++r) {
    __m256 x[V];
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v)
      x[v] = (Masked && v == V - 1) ? _mm256_maskload_ps(a + r * lda + 8 * v, mask)
                                    : _mm256_loadu_ps(a + r * lda + 8 * v);
#pragma GCC unroll 4
    for (int q = 0; q < MR; ++q) {
      const __m256 b = _mm256_broadcast_ss(s + q * R + r);
#pragma GCC unroll 3
      for (int v = 0; v < V; ++v) acc[q][v] = _mm256_fmadd_ps(b, x[v], acc[q][v]);
    }
  }
#pragma GCC unroll 4
  for (int q = 0; q < MR; ++q)
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) {
      if (Masked && v == V - 1)
        _mm256_maskstore_ps(w + q * ldw + 8 * v, mask, acc[q][v]);
      else
        _mm256_storeu_ps(w + q * ldw + 8 * v, acc[q][v]);
    }
}

// Rows [r0, r0 + MR) of W (k columns): 24 columns at a time, then 8, then a masked tail.
template <int MR>
LK_TILES_TARGET inline void scaled_rows(const float* s, int64_t R, const float* a, int64_t lda,
                                        int64_t k, float* w) {
  int64_t c = 0;
  for (; c + 24 <= k; c += 24) scaled_tile<MR, 3, false>(s, R, a + c, lda, w + c, k, _mm256_setzero_si256());
  for (; c + 8 <= k; c += 8) scaled_tile<MR, 1, false>(s, R, a + c, lda, w + c, k, _mm256_setzero_si256());
  if (c < k)
    scaled_tile<MR, 1, true>(s, R, a + c, lda, w + c, k, col_mask(k - c).lo);
}

// W (m, d, k) contiguous = Σ_r c[r / T, j] e[r, o] a[r, :] (see the top): A (R × k) and E
// (R × d) of row strides lda, lde and unit column strides, C (B × m) contiguous, R ≤
// kScaledRowsMax. Threads share blocks of four rows of W.
LK_TILES_TARGET inline void scaled_rows_gemm(const float* A, int64_t lda, const float* E,
                                             int64_t lde, const float* C, int64_t m,
                                             int64_t T, int64_t R, int64_t d, int64_t k,
                                             float* W) {
  constexpr int64_t MR = 4;
  const int64_t rows = m * d, blocks = (rows + MR - 1) / MR;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, MR * R * k));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    float s[MR * kScaledRowsMax];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t w0 = blk * MR, h = std::min(MR, rows - w0);
      for (int64_t q = 0; q < h; ++q) {  // s[q R + r] = c[r / T, j] e[r, o], row w0 + q = (j, o)
        const int64_t j = (w0 + q) / d, o = (w0 + q) % d;
        for (int64_t i = 0, r = 0; r < R; ++i) {  // sample i's T rows: no division per row
          const float c = C[i * m + j];
          for (const int64_t end = r + T; r < end; ++r) s[q * R + r] = c * E[r * lde + o];
        }
      }
      float* w = W + w0 * k;
      switch (h) {
        case 4: scaled_rows<4>(s, R, A, lda, k, w); break;
        case 3: scaled_rows<3>(s, R, A, lda, k, w); break;
        case 2: scaled_rows<2>(s, R, A, lda, k, w); break;
        default: scaled_rows<1>(s, R, A, lda, k, w); break;
      }
    }
  });
}
#endif

}  // namespace lowrank::tiles
