// Ω (lowrank/philox.h) for kLanes (row, column group) pairs at once, written as plain loops
// over lane arrays so that the compiler vectorizes Philox4x32-10 and the branch-free float32
// Box–Muller across the lanes: with the baseline ISA (SSE2 on x86-64), and with AVX2 inside
// a function compiled for it (LK_TARGET_AVX2; the caller dispatches at run time). The same
// operations lane by lane as philox::omega_group, so the same bits (no FMA: the AVX2 target
// leaves it out, and x86-64 builds do not contract without it).
#pragma once
#include <cmath>
#include <cstdint>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LK_X86 1
#define LK_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define LK_X86 0
#define LK_TARGET_AVX2
#endif

#include "lowrank/philox.h"

#if defined(__GNUC__)
#define LK_INLINE inline __attribute__((always_inline))
#define LK_FLATTEN __attribute__((flatten))  // everything it calls inlined: one ISA throughout
#else
#define LK_INLINE inline
#define LK_FLATTEN
#endif

namespace lowrank {
namespace philox {

constexpr int kLanes = 16;  // pairs per batch: 4 SSE / 2 AVX vectors

// The instruction set a batch is compiled for (the sqrt it can issue on whole vectors).
enum class Isa { kBase, kAvx2 };

// True when this CPU runs the AVX2 paths.
inline bool cpu_has_avx2() {
#if LK_X86
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
#else
  return false;
#endif
}

// v = sqrt(v) lane by lane, correctly rounded (sqrtps; std::sqrt elsewhere): a libm sqrtf
// call (errno) would keep the compiler from vectorizing the loops around it.
inline void sqrt_lanes_base(float (&v)[kLanes]) {
#if LK_X86
  for (int t = 0; t < kLanes; t += 4) _mm_storeu_ps(v + t, _mm_sqrt_ps(_mm_loadu_ps(v + t)));
#else
  for (float& x : v) x = std::sqrt(x);
#endif
}

#if LK_X86
LK_TARGET_AVX2 inline void sqrt_lanes_avx2(float (&v)[kLanes]) {
  for (int t = 0; t < kLanes; t += 8) _mm256_storeu_ps(v + t, _mm256_sqrt_ps(_mm256_loadu_ps(v + t)));
}
#endif

template <Isa isa>
LK_INLINE void sqrt_lanes(float (&v)[kLanes]) {
#if LK_X86
  if constexpr (isa == Isa::kAvx2) {
    sqrt_lanes_avx2(v);
    return;
  }
#endif
  sqrt_lanes_base(v);
}

#if LK_X86
// (hi, lo) of the 64-bit products m * v lane by lane (8 uint32 lanes): vpmuludq takes the
// even lanes, and the odd ones shifted down.
LK_TARGET_AVX2 inline void mul_hi_lo_avx2(__m256i m, __m256i v, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(v, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(v, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// philox4x32_10 of kLanes counters (g[t], lo[t], hi[t], 0), 8 lanes per AVX2 vector, the
// kLanes / 8 vectors round by round (independent chains for the out-of-order core): the same
// rounds as philox_round.
LK_TARGET_AVX2 inline void philox_lanes_avx2(std::uint64_t seed, const std::uint32_t (&g)[kLanes],
                                             const std::uint32_t (&lo)[kLanes],
                                             const std::uint32_t (&hi)[kLanes],
                                             std::uint32_t (&x)[4][kLanes]) {
  constexpr int kV = kLanes / 8;
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kMul0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kMul1));
  const __m256i w0 = _mm256_set1_epi32(static_cast<int>(kWeyl0));
  const __m256i w1 = _mm256_set1_epi32(static_cast<int>(kWeyl1));
  __m256i k0 = _mm256_set1_epi32(static_cast<int>(static_cast<std::uint32_t>(seed)));
  __m256i k1 = _mm256_set1_epi32(static_cast<int>(static_cast<std::uint32_t>(seed >> 32)));
  __m256i c0[kV], c1[kV], c2[kV], c3[kV];
  for (int v = 0; v < kV; ++v) {
    c0[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + 8 * v));
    c1[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + 8 * v));
    c2[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi + 8 * v));
    c3[v] = _mm256_setzero_si256();
  }
  for (int r = 0; r < 10; ++r) {
    for (int v = 0; v < kV; ++v) {
      __m256i hi0, lo0, hi1, lo1;
      mul_hi_lo_avx2(m0, c0[v], hi0, lo0);
      mul_hi_lo_avx2(m1, c2[v], hi1, lo1);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[v]), k0);
      c1[v] = lo1;
      c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[v]), k1);
      c3[v] = lo0;
    }
    k0 = _mm256_add_epi32(k0, w0);
    k1 = _mm256_add_epi32(k1, w1);
  }
  for (int v = 0; v < kV; ++v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x[0] + 8 * v), c0[v]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x[1] + 8 * v), c1[v]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x[2] + 8 * v), c2[v]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x[3] + 8 * v), c3[v]);
  }
}
#endif

// x[q][t]: the words of Philox4x32-10 on counter (g[t], lo[t], hi[t], 0).
template <Isa isa>
LK_INLINE void philox_lanes(std::uint64_t seed, const std::uint32_t (&g)[kLanes],
                            const std::uint32_t (&lo)[kLanes], const std::uint32_t (&hi)[kLanes],
                            std::uint32_t (&x)[4][kLanes]) {
#if LK_X86
  if constexpr (isa == Isa::kAvx2) {
    philox_lanes_avx2(seed, g, lo, hi, x);
    return;
  }
#endif
  for (int t = 0; t < kLanes; ++t) {
    const Block4 w = philox4x32_10({{g[t], lo[t], hi[t], 0u}}, static_cast<std::uint32_t>(seed),
                                   static_cast<std::uint32_t>(seed >> 32));
    for (int q = 0; q < 4; ++q) x[q][t] = w.x[q];
  }
}

// z[q][t] = Ω[i_t, 4 g[t] + q] of lanes t (row i_t = lo[t] + 2^32 hi[t]), Gaussian or ±1.
template <Isa isa>
LK_INLINE void omega_lanes(std::uint64_t seed, const std::uint32_t (&g)[kLanes],
                           const std::uint32_t (&lo)[kLanes], const std::uint32_t (&hi)[kLanes],
                           bool rademacher, float (&z)[4][kLanes]) {
  std::uint32_t x[4][kLanes];
  philox_lanes<isa>(seed, g, lo, hi, x);
  if (rademacher) {
    for (int q = 0; q < 4; ++q)
      for (int t = 0; t < kLanes; ++t) z[q][t] = 1.0f - 2.0f * static_cast<float>(x[q][t] >> 31);
    return;
  }
  // box_muller of pairs (x0, x1) and (x2, x3), step by step.
  float r[2][kLanes], c[2][kLanes], s[2][kLanes];
  for (int p = 0; p < 2; ++p)
    for (int t = 0; t < kLanes; ++t) {
      r[p][t] = radius_squared(x[2 * p][t]);
      cos_sin(x[2 * p + 1][t], c[p][t], s[p][t]);
    }
  sqrt_lanes<isa>(r[0]);
  sqrt_lanes<isa>(r[1]);
  for (int p = 0; p < 2; ++p)
    for (int t = 0; t < kLanes; ++t) {
      z[2 * p][t] = r[p][t] * c[p][t];
      z[2 * p + 1][t] = r[p][t] * s[p][t];
    }
}

}  // namespace philox
}  // namespace lowrank
