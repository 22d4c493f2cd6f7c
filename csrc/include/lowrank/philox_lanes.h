// Ω (lowrank/philox.h) many entries at a time, with the same float32 operations entry by entry
// as philox::omega_group (the AVX2 code: or integer ones that give the same values, noted
// where used), so the same bits (float32 mul and add never fused: the AVX2 target leaves FMA
// out, and x86-64 builds do not contract without it):
//   omega_lanes<isa>  kLanes (row, column group) pairs given one by one: plain loops over lane
//                     arrays that the compiler vectorizes with the baseline ISA (SSE2 on
//                     x86-64); for Isa::kAvx2 the AVX2 code below;
//   omega_rows_avx2   8 consecutive rows × V column groups in AVX2 registers, the rows' and the
//                     groups' shares of Philox's first two rounds computed once (GroupWords,
//                     RowWords8): 8 of the 10 rounds per entry.
// AVX2 code runs inside functions compiled for it (LK_TARGET_AVX2; the caller dispatches at run
// time on cpu_has_avx2).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <vector>
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

// The instruction set a batch is compiled for.
enum class Isa { kBase, kAvx2 };

// True when this CPU runs the AVX2 paths (LOWRANK_NO_AVX2=1 set before the first call: the
// baseline-ISA paths on any CPU; the tests compare their bits).
inline bool cpu_has_avx2() {
#if LK_X86
  static const bool has = [] {
    const char* off = std::getenv("LOWRANK_NO_AVX2");
    return __builtin_cpu_supports("avx2") && !(off && std::string_view(off) == "1");
  }();
  return has;
#else
  return false;
#endif
}

// v = sqrt(v) lane by lane, correctly rounded (sqrtps; std::sqrt elsewhere): a libm sqrtf
// call (errno) would keep the compiler from vectorizing the loops around it.
inline void sqrt_lanes(float (&v)[kLanes]) {
#if LK_X86
  for (int t = 0; t < kLanes; t += 4) _mm_storeu_ps(v + t, _mm_sqrt_ps(_mm_loadu_ps(v + t)));
#else
  for (float& x : v) x = std::sqrt(x);
#endif
}

// Philox's first two rounds on counter (g, lo, hi, 0), key (k0, k1): round 0 gives
// (s0, s1, s2, s3) = (hi(M1 hi) ^ lo ^ k0, lo(M1 hi), hi(M0 g) ^ k1, lo(M0 g)), round 1
// (hi(M1 s2) ^ s1 ^ (k0 + W0), lo(M1 s2), hi(M0 s0) ^ s3 ^ (k1 + W1), lo(M0 s0)): words of
// the group alone (a, b, c below) combined with words of the row alone (s1, hi/lo(M0 s0)).
struct GroupWords {
  std::uint32_t a, b, c;  // hi(M1 s2) ^ (k0 + W0), lo(M1 s2), s3 ^ (k1 + W1)
};

inline GroupWords group_words(std::uint64_t seed, std::uint64_t g) {
  const auto k0 = static_cast<std::uint32_t>(seed), k1 = static_cast<std::uint32_t>(seed >> 32);
  const std::uint64_t p0 = static_cast<std::uint64_t>(kMul0) * static_cast<std::uint32_t>(g);
  const std::uint32_t s2 = static_cast<std::uint32_t>(p0 >> 32) ^ k1;
  const std::uint64_t p1 = static_cast<std::uint64_t>(kMul1) * s2;
  return {static_cast<std::uint32_t>(p1 >> 32) ^ (k0 + kWeyl0), static_cast<std::uint32_t>(p1),
          static_cast<std::uint32_t>(p0) ^ (k1 + kWeyl1)};
}

// group_words of the column groups g0 .. g0 + n - 1.
inline std::vector<GroupWords> group_table(std::uint64_t seed, std::uint64_t g0, std::int64_t n) {
  std::vector<GroupWords> t(static_cast<std::size_t>(n));
  for (std::int64_t g = 0; g < n; ++g)
    t[static_cast<std::size_t>(g)] = group_words(seed, g0 + static_cast<std::uint64_t>(g));
  return t;
}

// omega_lanes on 8 rows × 2 column groups: z[q][8 v + t] = Ω[i0 + t, 4 (g + v) + q].
template <Isa isa>
LK_INLINE void omega_rows_lanes(std::uint64_t seed, std::uint64_t i0, std::uint64_t g,
                                bool rademacher, float (&z)[4][kLanes]);

#if LK_X86
// (hi, lo) of the 64-bit products m * v lane by lane (8 uint32 lanes): vpmuludq takes the
// even lanes, and the odd ones shifted down, for hi; vpmulld gives lo.
LK_TARGET_AVX2 inline void mul_hi_lo_avx2(__m256i m, __m256i v, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(v, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(v, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_mullo_epi32(v, m);
}

// ---- AVX2, in registers: 8 counters per vector -------------------------------------------
// The same operations as philox_round / box_muller, written with intrinsics (the compiler's
// vectorization of the lane loops kept its arrays in memory and turned the selects into
// compares and blends): conditional negations as sign-bit XORs, selects on a word's bit as
// blendv on that bit shifted to the sign, float32 mul and add never fused (no FMA). Each
// statement runs on V independent vectors before the next one, so that the long dependency
// chains (Philox's rounds, ln's polynomial, the division, the root) of V vectors overlap in
// the out-of-order window (measured 2x the throughput of one vector at a time); the cos/sin
// of the angle words, which depend on nothing of the radius, are issued in between ln's
// polynomial steps and the divisions and roots (fill points: issued one after the other,
// those chains leave the pipes idle; measured 1.1x the throughput on Zen 3, whose 4 pipes
// the Box–Muller then keeps busy: no fewer operations, the same bits).
#define LK_EACH(v, V) _Pragma("GCC unroll 8") for (int v = 0; v < V; ++v)

// The round keys (lo32 seed, hi32 seed) + r (W0, W1), r = 0..9, broadcast once per kernel.
struct RoundKeys {
  __m256i k0[10], k1[10];
};

LK_TARGET_AVX2 inline RoundKeys round_keys_avx2(std::uint64_t seed) {
  RoundKeys k;
  auto s0 = static_cast<std::uint32_t>(seed), s1 = static_cast<std::uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r, s0 += kWeyl0, s1 += kWeyl1) {
    k.k0[r] = _mm256_set1_epi32(static_cast<int>(s0));
    k.k1[r] = _mm256_set1_epi32(static_cast<int>(s1));
  }
  return k;
}

// Rounds first .. 9 of Philox4x32-10 (philox_round) on V × 8 counter states.
template <int V>
LK_TARGET_AVX2 LK_INLINE void rounds_avx2(const RoundKeys& key, int first, __m256i (&c)[V][4]) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kMul0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kMul1));
  for (int r = first; r < 10; ++r)
    LK_EACH(v, V) {
      __m256i hi0, lo0, hi1, lo1;
      const __m256i c1k = _mm256_xor_si256(c[v][1], key.k0[r]);
      const __m256i c3k = _mm256_xor_si256(c[v][3], key.k1[r]);
      mul_hi_lo_avx2(m0, c[v][0], hi0, lo0);
      mul_hi_lo_avx2(m1, c[v][2], hi1, lo1);
      c[v][0] = _mm256_xor_si256(hi1, c1k);
      c[v][1] = lo1;
      c[v][2] = _mm256_xor_si256(hi0, c3k);
      c[v][3] = lo0;
    }
}

LK_TARGET_AVX2 LK_INLINE __m256 f32(float x) { return _mm256_set1_ps(x); }
LK_TARGET_AVX2 LK_INLINE __m256i u32(std::uint32_t x) {
  return _mm256_set1_epi32(static_cast<int>(x));
}
LK_TARGET_AVX2 LK_INLINE __m256 add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
LK_TARGET_AVX2 LK_INLINE __m256 sub(__m256 a, __m256 b) { return _mm256_sub_ps(a, b); }
LK_TARGET_AVX2 LK_INLINE __m256 mul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
LK_TARGET_AVX2 LK_INLINE __m256 as_ps(__m256i a) { return _mm256_castsi256_ps(a); }
LK_TARGET_AVX2 LK_INLINE __m256i as_si(__m256 a) { return _mm256_castps_si256(a); }

// log_fp32 of V × 8 normal x > 0; fill(i) after the polynomial's step i = 0..7.
template <int V, class Fill>
LK_TARGET_AVX2 LK_INLINE void log_avx2(__m256 (&x)[V], Fill&& fill) {
  __m256 f[V], z[V], e[V], p[V];
  // x = m' 2^e with m' in [sqrt(1/2), sqrt(2)) from the bits of x less those of sqrt(1/2)
  // (musl's logf): m' = 2m and e - 1 where log_fp32 has m < sqrt(1/2), else m and e, and
  // f = m' - 1 (exact), its 2m - 1 or m - 1: the same f and e in 6 operations instead of 10
  LK_EACH(v, V) {
    const __m256i t = _mm256_sub_epi32(as_si(x[v]), u32(0x3F3504F3u));  // sqrt(1/2)
    e[v] = _mm256_cvtepi32_ps(_mm256_srai_epi32(t, 23));
    const __m256 m = as_ps(_mm256_add_epi32(_mm256_and_si256(t, u32(0x007FFFFFu)),
                                            u32(0x3F3504F3u)));
    f[v] = sub(m, f32(1.0f));
    z[v] = mul(f[v], f[v]);
    p[v] = f32(0x1.204376p-4f);
  }
  constexpr float kP[8] = {-0x1.d7a370p-4f, 0x1.de4a34p-4f, -0x1.fcba9ep-4f, 0x1.23d37ep-3f,
                           -0x1.555ca0p-3f, 0x1.999d58p-3f, -0x1.fffff8p-3f, 0x1.555554p-2f};
  _Pragma("GCC unroll 8") for (int i = 0; i < 8; ++i) {
    LK_EACH(v, V) p[v] = add(mul(p[v], f[v]), f32(kP[i]));
    fill(i);
  }
  LK_EACH(v, V) {
    __m256 y = mul(mul(p[v], f[v]), z[v]);
    y = add(y, mul(e[v], f32(-0x1.bd0106p-13f)));
    y = add(y, mul(f32(-0.5f), z[v]));
    x[v] = add(add(f[v], y), mul(e[v], f32(0.693359375f)));
  }
}

// sqrt(radius_squared(a)) of V × 8 words a. The word used, a (a < 2^31) or ~a, converts as
// an int32: x = u = (a + 1/2) 2^-32 or w = (~a + 1/2) 2^-32, as in radius_squared.
// fill(i) at V + 8 points: i = 0..7 in ln's polynomial, 8 + v after the root of vector v.
template <int V, class Fill>
LK_TARGET_AVX2 LK_INLINE void radius_avx2(const __m256i (&a)[V], __m256 (&r)[V], Fill&& fill) {
  __m256 x[V], lg[V];
  LK_EACH(v, V) {
    const __m256 upper = as_ps(a[v]);  // sign bit: a >= 2^31
    const __m256i used = as_si(_mm256_blendv_ps(upper, as_ps(_mm256_xor_si256(a[v],
                                                 u32(0xFFFFFFFFu))), upper));
    x[v] = mul(add(_mm256_cvtepi32_ps(used), f32(0.5f)), f32(0x1p-32f));
    lg[v] = _mm256_blendv_ps(x[v], sub(f32(1.0f), x[v]), upper);  // u or y = 1 - w
  }
  log_avx2(lg, fill);
  LK_EACH(v, V) {
    const __m256 upper = as_ps(a[v]);
    const __m256 y = sub(f32(1.0f), x[v]);
    const __m256 one = _mm256_cmp_ps(y, f32(1.0f), _CMP_EQ_OQ);
    const __m256 neg_w = _mm256_xor_ps(x[v], f32(-0.0f));
    // radius_squared's log1p without its select on the denominator: where y == 1 the
    // quotient is -w/0 = -inf, lg = ln 1 = 0 and the product NaN, which the select below
    // replaces by -w (the same bits, one operation less)
    const __m256 log1p = mul(lg[v], _mm256_div_ps(neg_w, sub(y, f32(1.0f))));
    r[v] = _mm256_sqrt_ps(mul(f32(-2.0f), _mm256_blendv_ps(
        lg[v], _mm256_blendv_ps(log1p, neg_w, one), upper)));
    fill(8 + v);
  }
}

// (cos θ, sin θ) of 8 words b: cos_sin.
LK_TARGET_AVX2 LK_INLINE void cos_sin_avx2(__m256i b, __m256& c, __m256& s) {
  // f = the low 29 bits of b, of ~b in odd octants (bit 29 of b set)
  const __m256i odd = _mm256_srai_epi32(_mm256_slli_epi32(b, 2), 31);
  const __m256i f = _mm256_and_si256(_mm256_xor_si256(b, odd), u32(0x1FFFFFFFu));
  const __m256 beta = mul(add(_mm256_cvtepi32_ps(f), f32(0.5f)), f32(0x1.921fb6p-30f));
  const __m256 z = mul(beta, beta);
  const __m256 sb = add(beta, mul(mul(beta, z), add(f32(-0x1.555546p-3f),
                        mul(z, add(f32(0x1.11073cp-7f), mul(z, f32(-0x1.9943f2p-13f)))))));
  const __m256 cb = add(sub(f32(1.0f), mul(f32(0.5f), z)),
                        mul(mul(z, z), add(f32(0x1.55554ap-5f),
                            mul(z, add(f32(-0x1.6c0c34p-10f), mul(z, f32(0x1.99eb9cp-16f)))))));
  // octant o = b >> 29: swapped for o in {1, 2, 5, 6} (bit 30 of b + 2^29), cos negated
  // for o in {2, 3, 4, 5} (bit 31 of b + 2^30), sin for o >= 4 (bit 31 of b)
  const __m256 swap = as_ps(_mm256_slli_epi32(_mm256_add_epi32(b, u32(0x20000000u)), 1));
  const __m256 sign = f32(-0.0f);
  const __m256 neg_cos = _mm256_and_ps(as_ps(_mm256_add_epi32(b, u32(0x40000000u))), sign);
  c = _mm256_xor_ps(_mm256_blendv_ps(cb, sb, swap), neg_cos);
  s = _mm256_xor_ps(_mm256_blendv_ps(sb, cb, swap), _mm256_and_ps(as_ps(b), sign));
}

// z[v][q] = the entries of the words x[v][q] of V × 8 counters: Gaussian (box_muller of
// (x0, x1) and (x2, x3)) or ±1.
template <int V>
LK_TARGET_AVX2 LK_INLINE void omega_avx2(const __m256i (&x)[V][4], bool rademacher,
                                         __m256 (&z)[V][4]) {
  if (rademacher) {
    LK_EACH(v, V) for (int q = 0; q < 4; ++q)  // 1 - 2 (x >> 31): 1.0 with x's sign bit
      z[v][q] = _mm256_or_ps(f32(1.0f), _mm256_and_ps(as_ps(x[v][q]), f32(-0.0f)));
    return;
  }
  __m256i a[2 * V], b[2 * V];
  LK_EACH(v, V) for (int p = 0; p < 2; ++p) {
    a[2 * v + p] = x[v][2 * p];
    b[2 * v + p] = x[v][2 * p + 1];
  }
  // pair u's cos/sin at fill point u (P / N) of the P = N + 8 points, N = 2 V pairs
  constexpr int N = 2 * V, P = N + 8;
  __m256 r[N], c[N], s[N];
  radius_avx2(a, r, [&](int i) LK_TARGET_AVX2 {
    _Pragma("GCC unroll 8") for (int u = 0; u < N; ++u)
      if (u * P / N == i) cos_sin_avx2(b[u], c[u], s[u]);
  });
  LK_EACH(v, V) for (int p = 0; p < 2; ++p) {
    z[v][2 * p] = mul(r[2 * v + p], c[2 * v + p]);
    z[v][2 * p + 1] = mul(r[2 * v + p], s[2 * v + p]);
  }
}

struct RowWords8 {
  __m256i s1, m_hi, m_lo;  // lo(M1 hi), hi(M0 s0), lo(M0 s0) of rows i0 + t, t = 0..7
};

LK_TARGET_AVX2 inline RowWords8 row_words_avx2(std::uint64_t seed, std::uint64_t i0) {
  alignas(32) std::uint32_t lo[8], hi[8];
  for (int t = 0; t < 8; ++t) {
    lo[t] = static_cast<std::uint32_t>(i0 + t);
    hi[t] = static_cast<std::uint32_t>((i0 + t) >> 32);
  }
  __m256i p_hi, p_lo;
  mul_hi_lo_avx2(u32(kMul1), _mm256_load_si256(reinterpret_cast<const __m256i*>(hi)), p_hi, p_lo);
  const __m256i s0 = _mm256_xor_si256(_mm256_xor_si256(p_hi, u32(static_cast<std::uint32_t>(seed))),
                                      _mm256_load_si256(reinterpret_cast<const __m256i*>(lo)));
  RowWords8 r;
  r.s1 = p_lo;
  mul_hi_lo_avx2(u32(kMul0), s0, r.m_hi, r.m_lo);
  return r;
}

// z[v][q] lane t = Ω[i0 + t, 4 g + q] for the rows i0 + t of rows[v rows_step] and the
// group g of groups[v group_step] (steps 0 or 1: V row batches of one group, or one row batch
// and V groups).
template <int V>
LK_TARGET_AVX2 LK_INLINE void omega_rows_avx2(const RoundKeys& key, const RowWords8* rows,
                                              int rows_step, const GroupWords* groups,
                                              int group_step, bool rademacher,
                                              __m256 (&z)[V][4]) {
  __m256i c[V][4];
  LK_EACH(v, V) {
    const RowWords8& r = rows[v * rows_step];
    const GroupWords& g = groups[v * group_step];
    c[v][0] = _mm256_xor_si256(r.s1, u32(g.a));
    c[v][1] = u32(g.b);
    c[v][2] = _mm256_xor_si256(r.m_hi, u32(g.c));
    c[v][3] = r.m_lo;
  }
  rounds_avx2<V>(key, 2, c);
  omega_avx2<V>(c, rademacher, z);
}

// omega_lanes' AVX2 code: the kLanes counters as two vectors, all ten rounds.
LK_TARGET_AVX2 inline void omega_lanes_avx2(std::uint64_t seed, const std::uint32_t (&g)[kLanes],
                                            const std::uint32_t (&lo)[kLanes],
                                            const std::uint32_t (&hi)[kLanes], bool rademacher,
                                            float (&z)[4][kLanes]) {
  constexpr int V = kLanes / 8;
  __m256i c[V][4];
  LK_EACH(v, V) {
    c[v][0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + 8 * v));
    c[v][1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + 8 * v));
    c[v][2] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi + 8 * v));
    c[v][3] = _mm256_setzero_si256();
  }
  rounds_avx2<V>(round_keys_avx2(seed), 0, c);
  __m256 out[V][4];
  omega_avx2<V>(c, rademacher, out);
  LK_EACH(v, V) for (int q = 0; q < 4; ++q) _mm256_storeu_ps(z[q] + 8 * v, out[v][q]);
}
#endif

// z[q][t] = Ω[i_t, 4 g[t] + q] of lanes t (row i_t = lo[t] + 2^32 hi[t]), Gaussian or ±1.
template <Isa isa>
LK_INLINE void omega_lanes(std::uint64_t seed, const std::uint32_t (&g)[kLanes],
                           const std::uint32_t (&lo)[kLanes], const std::uint32_t (&hi)[kLanes],
                           bool rademacher, float (&z)[4][kLanes]) {
#if LK_X86
  if constexpr (isa == Isa::kAvx2) {
    omega_lanes_avx2(seed, g, lo, hi, rademacher, z);
    return;
  }
#endif
  std::uint32_t x[4][kLanes];
  for (int t = 0; t < kLanes; ++t) {
    const Block4 w = philox4x32_10({{g[t], lo[t], hi[t], 0u}}, static_cast<std::uint32_t>(seed),
                                   static_cast<std::uint32_t>(seed >> 32));
    for (int q = 0; q < 4; ++q) x[q][t] = w.x[q];
  }
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
  sqrt_lanes(r[0]);
  sqrt_lanes(r[1]);
  for (int p = 0; p < 2; ++p)
    for (int t = 0; t < kLanes; ++t) {
      z[2 * p][t] = r[p][t] * c[p][t];
      z[2 * p + 1][t] = r[p][t] * s[p][t];
    }
}

template <Isa isa>
LK_INLINE void omega_rows_lanes(std::uint64_t seed, std::uint64_t i0, std::uint64_t g,
                                bool rademacher, float (&z)[4][kLanes]) {
  std::uint32_t gs[kLanes], lo[kLanes], hi[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    const std::uint64_t i = i0 + static_cast<std::uint64_t>(l % 8);
    gs[l] = static_cast<std::uint32_t>(g + static_cast<std::uint64_t>(l / 8));
    lo[l] = static_cast<std::uint32_t>(i);
    hi[l] = static_cast<std::uint32_t>(i >> 32);
  }
  omega_lanes<isa>(seed, gs, lo, hi, rademacher, z);
}

}  // namespace philox
}  // namespace lowrank
