// float32 register-tiled products of the layer ops' CPU kernels (AVX2 + FMA, chosen at run
// time; callers check has_avx2_fma() and keep a BLAS path otherwise):
//
//   xt_y:        C (m × n) (+)= Xᵀ Y = Σ_k x_kᵀ y_k   over the K rows of X (K × m), Y (K × n)
//   syrk_lower:  W (n × n) = X Xᵀ on and below the diagonal (tiles crossing it also above)
//   hadamard_lower: K (+)= (P + b) ⊙ Q on and below the diagonal, mirrored (the T = 1 Gram's
//                   (A Aᵀ + b) ⊙ (E Eᵀ) from the two syrk_lower results)
//
// xt_y sums rank-1 updates into a 6 × 16 tile of C held in 12 ymm registers: per k, six
// broadcasts of the row side and two 8-float loads of the column side; it reads X and Y in
// place (the per-sample gradient G_i = E_iᵀ A_i of T token rows needs no transpose), its sums
// in index order of k with FMA, as a GEMM's. syrk_lower takes dot products instead: a 3 × 4
// tile of W in 12 ymm registers of 8 partial sums each (per 8 columns of X seven loads, twelve
// FMAs), rows of X read in place (no transposed packing) and the tiles crossing the diagonal
// only 3 × 4: about half of a GEMM's flops (measured 1 thread, n × K = 64 × 512 .. 256 × 1024:
// 1.8-2.0x faster than MKL's sgemm for the full X Xᵀ; MKL's own ssyrk is not exported by torch,
// and its internal one takes sgemmt on AMD, 1.3x).
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define LK_TILES_AVX2 1
#define LK_TILES_TARGET __attribute__((target("avx2,fma")))
#endif

namespace lowrank::tiles {

inline bool has_avx2_fma() {
#ifdef LK_TILES_AVX2
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

#ifdef LK_TILES_AVX2
constexpr int kRows = 6, kCols = 16;
// Rows of X (k) per block of xt_y (a 16-column panel of Y, kKBlock × 16 floats, stays in L1).
constexpr int64_t kKBlock = 256;
// Floats of Y's block up to which xt_y writes C row after row (Y in L1; at 4 × 1024 × 1024,
// 1.75x faster than by column panels, whose rows of C are 4 KiB apart).
constexpr int64_t kL1Floats = 4096;

// Lanes of the columns j < nr of a 16-wide tile (nr < 16).
struct ColMask {
  __m256i lo, hi;
};
LK_TILES_TARGET inline ColMask col_mask(int64_t nr) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i n = _mm256_set1_epi32(static_cast<int>(nr));
  return {_mm256_cmpgt_epi32(n, idx),
          _mm256_cmpgt_epi32(n, _mm256_add_epi32(idx, _mm256_set1_epi32(8)))};
}

template <bool Masked>
LK_TILES_TARGET inline __m256 load8(const float* p, __m256i mask) {
  if constexpr (Masked) return _mm256_maskload_ps(p, mask);
  else return _mm256_loadu_ps(p);
}

// C[r, j] (+)= Σ_{k < K} x[k·ldx + r] · v[k·vs + j] for r < M, j < 16 (j < nr if Masked:
// only those columns of v are read and of C written). accumulate: C's tile is added to.
template <int M, bool Masked>
LK_TILES_TARGET inline void tile(const float* x, int64_t ldx, const float* v, int64_t vs,
                                 int64_t K, float* c, int64_t ldc, int64_t nr, bool accumulate) {
  const ColMask mask = Masked ? col_mask(nr) : ColMask{};
  // (every loop over r and h unrolled: the accumulators stay in registers)
  __m256 acc[M][2];
#pragma GCC unroll 6
  for (int r = 0; r < M; ++r) {
    acc[r][0] = accumulate ? load8<Masked>(c + r * ldc, mask.lo) : _mm256_setzero_ps();
    acc[r][1] = accumulate ? load8<Masked>(c + r * ldc + 8, mask.hi) : _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m256 v0 = load8<Masked>(v + k * vs, mask.lo);
    const __m256 v1 = load8<Masked>(v + k * vs + 8, mask.hi);
#pragma GCC unroll 6
    for (int r = 0; r < M; ++r) {
      const __m256 b = _mm256_broadcast_ss(x + k * ldx + r);
      acc[r][0] = _mm256_fmadd_ps(b, v0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(b, v1, acc[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < M; ++r) {
    if constexpr (Masked) {
      _mm256_maskstore_ps(c + r * ldc, mask.lo, acc[r][0]);
      _mm256_maskstore_ps(c + r * ldc + 8, mask.hi, acc[r][1]);
    } else {
      _mm256_storeu_ps(c + r * ldc, acc[r][0]);
      _mm256_storeu_ps(c + r * ldc + 8, acc[r][1]);
    }
  }
}

// tile<m, nr < 16> for 1 <= m <= 6.
template <bool Masked>
LK_TILES_TARGET inline void tile_rows(int64_t m, const float* x, int64_t ldx, const float* v,
                                      int64_t vs, int64_t K, float* c, int64_t ldc, int64_t nr,
                                      bool accumulate) {
  switch (m) {
    case 6: return tile<6, Masked>(x, ldx, v, vs, K, c, ldc, nr, accumulate);
    case 5: return tile<5, Masked>(x, ldx, v, vs, K, c, ldc, nr, accumulate);
    case 4: return tile<4, Masked>(x, ldx, v, vs, K, c, ldc, nr, accumulate);
    case 3: return tile<3, Masked>(x, ldx, v, vs, K, c, ldc, nr, accumulate);
    case 2: return tile<2, Masked>(x, ldx, v, vs, K, c, ldc, nr, accumulate);
    default: return tile<1, Masked>(x, ldx, v, vs, K, c, ldc, nr, accumulate);
  }
}

LK_TILES_TARGET inline void any_tile(int64_t m, int64_t nr, const float* x, int64_t ldx,
                                     const float* v, int64_t vs, int64_t K, float* c,
                                     int64_t ldc, bool accumulate) {
  if (nr == kCols) tile_rows<false>(m, x, ldx, v, vs, K, c, ldc, nr, accumulate);
  else tile_rows<true>(m, x, ldx, v, vs, K, c, ldc, nr, accumulate);
}

// C (m × n, row stride ldc) (+)= Xᵀ Y: X (K × m) and Y (K × n) of row strides ldx, ldy, unit
// column strides. One thread (callers parallelize over independent products).
LK_TILES_TARGET inline void xt_y(const float* X, int64_t ldx, const float* Y, int64_t ldy,
                                 int64_t K, int64_t m, int64_t n, float* C, int64_t ldc,
                                 bool accumulate) {
  if (K == 0 && !accumulate)
    for (int64_t i = 0; i < m; ++i) std::fill(C + i * ldc, C + i * ldc + n, 0.f);
  for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {
    const int64_t kb = std::min(kKBlock, K - k0);
    const bool add = accumulate || k0 > 0;
    auto at_tile = [&](int64_t i0, int64_t j0) {
      any_tile(std::min<int64_t>(kRows, m - i0), std::min<int64_t>(kCols, n - j0),
               X + k0 * ldx + i0, ldx, Y + k0 * ldy + j0, ldy, kb, C + i0 * ldc + j0, ldc,
               add);
    };
    if (kb * n <= kL1Floats) {  // Y's block in L1: C written row after row
      for (int64_t i0 = 0; i0 < m; i0 += kRows)
        for (int64_t j0 = 0; j0 < n; j0 += kCols) at_tile(i0, j0);
    } else {  // a 16-column panel of Y in L1 for all rows of C
      for (int64_t j0 = 0; j0 < n; j0 += kCols)
        for (int64_t i0 = 0; i0 < m; i0 += kRows) at_tile(i0, j0);
    }
  }
}

// Per-sample gradient rows G_i = E_i[:, lo:lo + h]ᵀ A_i (h × k) for the B samples: E (B, T, ·)
// and A (B, T, k) of sample strides sE, sA and token strides tE, tA (unit last strides), G_i at
// G + i·sG, rows of stride ldg. Threads share the samples.
inline void per_sample_grads(const float* E, int64_t sE, int64_t tE, const float* A, int64_t sA,
                             int64_t tA, int64_t B, int64_t T, int64_t lo, int64_t h,
                             int64_t k, float* G, int64_t sG, int64_t ldg) {
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i)
      xt_y(E + i * sE + lo, tE, A + i * sA, tA, T, h, k, G + i * sG, ldg, false);
  });
}

// acc + x[0:8] ⊙ y[0:8] (Square: x ⊙ x, y not read).
template <bool Square>
LK_TILES_TARGET inline __m256 dot_step(const float* x, const float* y, __m256 acc) {
  const __m256 u = _mm256_loadu_ps(x);
  return _mm256_fmadd_ps(u, Square ? u : _mm256_loadu_ps(y), acc);
}

// Σ_k a_k b_k (Square: ‖a‖², one load per element) with 32 partial sums (4 ymm FMA chains).
template <bool Square>
LK_TILES_TARGET inline float row_dot(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    s0 = dot_step<Square>(a + k, b + k, s0);
    s1 = dot_step<Square>(a + k + 8, b + k + 8, s1);
    s2 = dot_step<Square>(a + k + 16, b + k + 16, s2);
    s3 = dot_step<Square>(a + k + 24, b + k + 24, s3);
  }
  for (; k + 8 <= n; k += 8) s0 = dot_step<Square>(a + k, b + k, s0);
  const __m256 s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  float sum = _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
  for (; k < n; ++k) sum = std::fma(a[k], Square ? a[k] : b[k], sum);
  return sum;
}

// The lanes k < K - k0 of an 8-float step (K - k0 < 8).
LK_TILES_TARGET inline __m256i tail_mask(int64_t left) { return col_mask(left).lo; }

// out[r·ldo + c] (+)= x_r·y_c = Σ_k x[r·ldx + k] y[c·ldy + k] for r < 3, c < 4 (r < mr,
// c < nc stored; the rows and columns past them repeat the last one and are not stored), K
// floats each: 12 dot products in 8-float FMA chains, their lanes summed by a horizontal add
// tree at the end. Reads the rows in place (no packing).
LK_TILES_TARGET inline void dot_tile(const float* x, int64_t ldx, int64_t mr, const float* y,
                                     int64_t ldy, int64_t nc, int64_t K, float* out,
                                     int64_t ldo, bool accumulate) {
  const float* xr[3];
  const float* yc[4];
  for (int r = 0; r < 3; ++r) xr[r] = x + std::min<int64_t>(r, mr - 1) * ldx;
  for (int c = 0; c < 4; ++c) yc[c] = y + std::min<int64_t>(c, nc - 1) * ldy;
  __m256 acc[3][4];
#pragma GCC unroll 3
  for (int r = 0; r < 3; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_setzero_ps();
  auto step = [&](auto load) LK_TILES_TARGET {
    __m256 xv[3];
#pragma GCC unroll 3
    for (int r = 0; r < 3; ++r) xv[r] = load(xr[r]);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m256 yv = load(yc[c]);
#pragma GCC unroll 3
      for (int r = 0; r < 3; ++r) acc[r][c] = _mm256_fmadd_ps(xv[r], yv, acc[r][c]);
    }
  };
  int64_t k = 0;
  for (; k + 8 <= K; k += 8)
    step([k](const float* p) LK_TILES_TARGET { return _mm256_loadu_ps(p + k); });
  if (k < K) {
    const __m256i m = tail_mask(K - k);
    step([k, m](const float* p) LK_TILES_TARGET { return _mm256_maskload_ps(p + k, m); });
  }
#pragma GCC unroll 3
  for (int r = 0; r < 3; ++r) {
    if (r >= mr) break;
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[r][0], acc[r][1]),
                                    _mm256_hadd_ps(acc[r][2], acc[r][3]));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    float* o = out + r * ldo;
    if (nc == 4) {
      if (accumulate) s = _mm_add_ps(s, _mm_loadu_ps(o));
      _mm_storeu_ps(o, s);
    } else {
      alignas(16) float v[4];
      _mm_store_ps(v, s);
      for (int64_t c = 0; c < nc; ++c) o[c] = accumulate ? o[c] + v[c] : v[c];
    }
  }
}

// Columns of X per block of syrk_lower (a 3 × 4 tile's epilogue, its horizontal sums, once per
// kSyrkKc; the 4 rows of its column side, 16 KiB, stay in L1 while the row groups below stream
// past). Measured 1 thread, against MKL's sgemm for the full X Xᵀ (n × K = 64 × 512 ..
// 256 × 1024): 1.7-1.9x with 1024, 1.5-1.6x with 256.
constexpr int64_t kSyrkKc = 1024;
// Rows below a group of 4 from which syrk_lower copies the group contiguous (with fewer, the
// copy costs more than it saves: at 4 × 16384, 22 us against 14 us uncopied; at 256 × 4096
// and 512 × 1024 copied groups are 3-6% faster).
constexpr int64_t kSyrkCopyRows = 64;

// W[i, j] (+)= x_i·x_j for j <= i (and for the j > i of the 3 × 4 tiles crossing the diagonal):
// X (n × K) of row stride ldx, unit column stride; W (n × n) of row stride ldw. Dot-product
// tiles (dot_tile) over blocks of kSyrkKc columns: rows read in place, the tiles crossing the
// diagonal only 3 × 4. Per group of 4 rows j (copied contiguous when more than kSyrkCopyRows
// rows follow: rows 4 KiB apart would share L1 sets), the row groups i >= j stream past. Threads share the groups, in an order that pairs
// long and short ones. accumulate: W is added to (the same tiles as a first call wrote).
LK_TILES_TARGET inline void syrk_lower(const float* X, int64_t ldx, int64_t n, int64_t K,
                                       float* W, int64_t ldw, bool accumulate) {
  if (K == 0) {  // no columns: W (+)= 0
    if (!accumulate)
      for (int64_t i = 0; i < n; ++i) std::fill(W + i * ldw, W + i * ldw + i + 1, 0.f);
    return;
  }
  const int64_t groups = (n + 3) / 4;
  for (int64_t k0 = 0; k0 < K; k0 += kSyrkKc) {
    const int64_t kc = std::min(kSyrkKc, K - k0);
    const bool add = accumulate || k0 > 0;
    at::parallel_for(0, groups, 1, [&](int64_t lo, int64_t hi) {
      alignas(64) float cols[4 * kSyrkKc];
      for (int64_t q = lo; q < hi; ++q) {
        const int64_t p = q % 2 == 0 ? q / 2 : groups - 1 - q / 2;  // long, short, long, ...
        const int64_t j0 = 4 * p, nc = std::min<int64_t>(4, n - j0);
        const float* y = X + j0 * ldx + k0;
        int64_t ldy = ldx;
        if (n - j0 > kSyrkCopyRows) {
          for (int64_t j = 0; j < nc; ++j)
            std::copy(X + (j0 + j) * ldx + k0, X + (j0 + j) * ldx + k0 + kc, cols + j * kc);
          y = cols;
          ldy = kc;
        }
        for (int64_t i0 = j0; i0 < n; i0 += 3)
          dot_tile(X + i0 * ldx + k0, ldx, std::min<int64_t>(3, n - i0), y, ldy, nc, kc,
                   W + i0 * ldw + j0, ldw, add);
      }
    });
  }
}

// dst[k·ldd + r] = src[r·lds + k] for r, k < 8.
LK_TILES_TARGET inline void transpose8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

// K[i, j] (+)= (P[i, j] + b) Q[i, j] for j <= i, then (mirror) K[j, i] = K[i, j], for the
// rows i0 <= i < i1 (i1 - i0 = 8 or the last rows): n × n of row stride n, only the lower
// triangles of P and Q read (K may be P). The 8 × 8 blocks below the diagonal in 8-float steps,
// mirrored by register transposes (transpose8); the diagonal block and the last rows (n mod 8)
// one entry at a time.
LK_TILES_TARGET inline void hadamard_rows(const float* P, const float* Q, float b, int64_t n,
                                          int64_t i0, int64_t i1, float* K, bool accumulate,
                                          bool mirror) {
  auto entry = [&](int64_t i, int64_t j) {
    const float v = (accumulate ? K[i * n + j] : 0.f) + (P[i * n + j] + b) * Q[i * n + j];
    K[i * n + j] = v;
    if (mirror) K[j * n + i] = v;
  };
  if (i1 - i0 < 8) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = 0; j <= i; ++j) entry(i, j);
    return;
  }
  const __m256 vb = _mm256_set1_ps(b);
  for (int64_t j0 = 0; j0 < i0; j0 += 8) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t e = i * n + j0;
      __m256 v = _mm256_mul_ps(_mm256_add_ps(_mm256_loadu_ps(P + e), vb), _mm256_loadu_ps(Q + e));
      if (accumulate) v = _mm256_add_ps(v, _mm256_loadu_ps(K + e));
      _mm256_storeu_ps(K + e, v);
    }
    if (mirror) transpose8(K + i0 * n + j0, n, K + j0 * n + i0, n);
  }
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t j = i0; j <= i; ++j) entry(i, j);
}

// hadamard_rows over all rows (K (+)= (P + b) ⊙ Q on and below the diagonal, mirrored), by
// blocks of 8 rows that threads share.
inline void hadamard_lower(const float* P, const float* Q, float b, int64_t n, float* K,
                           bool accumulate, bool mirror) {
  at::parallel_for(0, (n + 7) / 8, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t q = lo; q < hi; ++q)
      hadamard_rows(P, Q, b, n, 8 * q, std::min(n, 8 * q + 8), K, accumulate, mirror);
  });
}
#endif

}  // namespace lowrank::tiles
