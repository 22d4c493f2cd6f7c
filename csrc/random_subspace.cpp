// lowrank_kernels::random_subspace_expand / ::random_subspace_project, CPU kernels registered on
// the public schemas (declared in lowrank_kernels/ops/random_subspace.py): the random basis
// P = s·Ω (D×d) is generated 8 consecutive rows at a time (lanes) and consumed at once, never
// stored (lowrank/philox_lanes.h: the same Ω bit for bit as philox.h):
//
//   expand   w_i = base_i + Σ_j Ω_ij (s α_j)   acc_i = (((acc_i + Ω_i,4g a_4g) + Ω_i,4g+1
//                                               a_4g+1) + ...) over the groups g in order
//   project  c_j = s Σ_i Ω_ij g_i              per fixed row chunk and block of kBlock column
//                                               groups: lane t of the sum of column j adds the
//                                               rows i ≡ t (mod 8) of the chunk in order, the
//                                               lanes summed as ((l0+l4)+(l2+l6))+((l1+l5)+
//                                               (l3+l7)), the chunks in order
//
// Accumulation in float32 (float64 for float64 inputs; Ω entries are float32, exact in both).
// The same order, so the same bits, on every path and thread count: AVX2 register kernels
// where the CPU has it (omega_rows_avx2: 8 rows × 4 column groups per step; runtime
// dispatch), the baseline ISA otherwise (omega_lanes: 8 rows × 2 groups); tasks in parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "lowrank/hd.h"
#include "lowrank/philox_lanes.h"

namespace lowrank {
namespace {

using philox::Isa;
using philox::kLanes;

constexpr index_t kBlock = 64;  // column groups (256 columns) per projection task: 8 KB of sums

// The lanes of a column's sum, added in the order the AVX2 horizontal sum takes.
template <class acc_t>
acc_t lane_sum(const acc_t* l) {
  return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

// ---- baseline ISA: omega_rows_lanes, 8 rows × 2 column groups (lane 8 v + t: row i0 + t,
// group g + v) -------------------------------------------------------------------------------
// w[i] = (base[i] +) Σ_j Ω_ij a_j for rows [r0, r1), r0 a multiple of 8.
template <class acc_t>
void expand_range_base(std::uint64_t seed, const acc_t* a, index_t groups, const acc_t* base,
                       bool rademacher, acc_t* w, index_t r0, index_t r1) {
  float z[4][kLanes];
  for (index_t i0 = r0; i0 < r1; i0 += 8) {
    acc_t acc[8] = {};
    for (index_t g = 0; g < groups; g += 2) {
      philox::omega_rows_lanes<Isa::kBase>(seed, static_cast<std::uint64_t>(i0),
                                           static_cast<std::uint64_t>(g), rademacher, z);
      for (index_t v = 0; v < std::min<index_t>(2, groups - g); ++v) {
        const acc_t* ag = a + 4 * (g + v);
        for (int t = 0; t < 8; ++t)
          acc[t] = acc[t] + static_cast<acc_t>(z[0][8 * v + t]) * ag[0] +
                   static_cast<acc_t>(z[1][8 * v + t]) * ag[1] +
                   static_cast<acc_t>(z[2][8 * v + t]) * ag[2] +
                   static_cast<acc_t>(z[3][8 * v + t]) * ag[3];
      }
    }
    const int n = static_cast<int>(std::min<index_t>(8, r1 - i0));
    for (int t = 0; t < n; ++t) w[i0 + t] = base ? base[i0 + t] + acc[t] : acc[t];
  }
}

// lanes[(g - g0) 32 + 8 q + t] = Σ_{r0 <= i < r1, i ≡ r0 + t (mod 8)} v_i Ω[i, 4 g + q] for the
// groups g0 <= g < g0 + ng.
template <class acc_t>
void project_block_base(std::uint64_t seed, const acc_t* v, index_t r0, index_t r1, index_t g0,
                        index_t ng, bool rademacher, acc_t* lanes) {
  std::fill(lanes, lanes + 32 * ng, acc_t(0));
  float z[4][kLanes];
  for (index_t i0 = r0; i0 < r1; i0 += 8) {
    acc_t vi[8];
    for (int t = 0; t < 8; ++t) vi[t] = i0 + t < r1 ? v[i0 + t] : acc_t(0);
    for (index_t g = 0; g < ng; g += 2) {
      philox::omega_rows_lanes<Isa::kBase>(seed, static_cast<std::uint64_t>(i0),
                                           static_cast<std::uint64_t>(g0 + g), rademacher, z);
      for (index_t u = 0; u < std::min<index_t>(2, ng - g); ++u)
        for (int q = 0; q < 4; ++q) {
          acc_t* l = lanes + 32 * (g + u) + 8 * q;
          for (int t = 0; t < 8; ++t) l[t] = l[t] + vi[t] * static_cast<acc_t>(z[q][8 * u + t]);
        }
    }
  }
}

// ---- AVX2: omega_rows_avx2 on 8 rows × 4 column groups ------------------------------------
#if LK_X86
struct F8 {  // 8 float32 sums
  __m256 x;
};
struct D8 {  // 8 float64 sums
  __m256d lo, hi;
};
template <class acc_t>
using Vec8 = std::conditional_t<std::is_same_v<acc_t, float>, F8, D8>;

LK_TARGET_AVX2 LK_INLINE F8 splat(float s) { return {_mm256_set1_ps(s)}; }
LK_TARGET_AVX2 LK_INLINE D8 splat(double s) { return {_mm256_set1_pd(s), _mm256_set1_pd(s)}; }
LK_TARGET_AVX2 LK_INLINE F8 load8(const float* p) { return {_mm256_loadu_ps(p)}; }
LK_TARGET_AVX2 LK_INLINE D8 load8(const double* p) {
  return {_mm256_loadu_pd(p), _mm256_loadu_pd(p + 4)};
}
LK_TARGET_AVX2 LK_INLINE void store8(float* p, F8 a) { _mm256_storeu_ps(p, a.x); }
LK_TARGET_AVX2 LK_INLINE void store8(double* p, D8 a) {
  _mm256_storeu_pd(p, a.lo);
  _mm256_storeu_pd(p + 4, a.hi);
}
// acc + s z (z: 8 float32 entries of Ω)
LK_TARGET_AVX2 LK_INLINE F8 madd(F8 acc, __m256 z, F8 s) {
  return {_mm256_add_ps(acc.x, _mm256_mul_ps(s.x, z))};
}
LK_TARGET_AVX2 LK_INLINE D8 madd(D8 acc, __m256 z, D8 s) {
  const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(z));
  const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(z, 1));
  return {_mm256_add_pd(acc.lo, _mm256_mul_pd(s.lo, lo)),
          _mm256_add_pd(acc.hi, _mm256_mul_pd(s.hi, hi))};
}

// Rows i0 .. i0 + 7 of (base +) Ω a, column groups 4 per step (then one by one), in order.
template <class acc_t>
LK_TARGET_AVX2 void expand_range_avx2(std::uint64_t seed, const acc_t* a, index_t groups,
                                      const philox::GroupWords* gw, const acc_t* base,
                                      bool rademacher, acc_t* w, index_t r0, index_t r1) {
  const philox::RoundKeys key = philox::round_keys_avx2(seed);
  for (index_t i0 = r0; i0 < r1; i0 += 8) {
    const philox::RowWords8 rows = philox::row_words_avx2(seed, static_cast<std::uint64_t>(i0));
    Vec8<acc_t> acc = splat(acc_t(0));
    index_t g = 0;
    for (; g + 4 <= groups; g += 4) {
      __m256 z[4][4];
      philox::omega_rows_avx2<4>(key, &rows, 0, gw + g, 1, rademacher, z);
      for (int v = 0; v < 4; ++v)
        for (int q = 0; q < 4; ++q) acc = madd(acc, z[v][q], splat(a[4 * (g + v) + q]));
    }
    for (; g < groups; ++g) {
      __m256 z[1][4];
      philox::omega_rows_avx2<1>(key, &rows, 0, gw + g, 1, rademacher, z);
      for (int q = 0; q < 4; ++q) acc = madd(acc, z[0][q], splat(a[4 * g + q]));
    }
    alignas(32) acc_t out[8];
    store8(out, acc);
    const int n = static_cast<int>(std::min<index_t>(8, r1 - i0));
    for (int t = 0; t < n; ++t) w[i0 + t] = base ? base[i0 + t] + out[t] : out[t];
  }
}

// project_block_base's lanes: a tile of up to kTile batches of 8 rows, then each group over
// the tile's batches, 4 batches per step (each lane adds its rows in order, as the base code).
template <class acc_t>
LK_TARGET_AVX2 void project_block_avx2(std::uint64_t seed, const acc_t* v, index_t r0, index_t r1,
                                       const philox::GroupWords* gw, index_t ng, bool rademacher,
                                       acc_t* lanes) {
  constexpr index_t kTile = 32;
  const philox::RoundKeys key = philox::round_keys_avx2(seed);
  std::fill(lanes, lanes + 32 * ng, acc_t(0));
  philox::RowWords8 rows[kTile];
  Vec8<acc_t> vi[kTile];
  for (index_t t0 = r0; t0 < r1; t0 += 8 * kTile) {
    const index_t nb = std::min(kTile, (r1 - t0 + 7) / 8);
    for (index_t b = 0; b < nb; ++b) {
      const index_t i0 = t0 + 8 * b;
      rows[b] = philox::row_words_avx2(seed, static_cast<std::uint64_t>(i0));
      alignas(32) acc_t tail[8] = {};
      if (i0 + 8 > r1) std::copy(v + i0, v + r1, tail);
      vi[b] = i0 + 8 <= r1 ? load8(v + i0) : load8(tail);
    }
    for (index_t g = 0; g < ng; ++g) {
      Vec8<acc_t> acc[4];
      for (int q = 0; q < 4; ++q) acc[q] = load8(lanes + 32 * g + 8 * q);
      index_t b = 0;
      for (; b + 4 <= nb; b += 4) {
        __m256 z[4][4];
        philox::omega_rows_avx2<4>(key, rows + b, 1, gw + g, 0, rademacher, z);
        for (int u = 0; u < 4; ++u)
          for (int q = 0; q < 4; ++q) acc[q] = madd(acc[q], z[u][q], vi[b + u]);
      }
      for (; b < nb; ++b) {
        __m256 z[1][4];
        philox::omega_rows_avx2<1>(key, rows + b, 1, gw + g, 0, rademacher, z);
        for (int q = 0; q < 4; ++q) acc[q] = madd(acc[q], z[0][q], vi[b]);
      }
      for (int q = 0; q < 4; ++q) store8(lanes + 32 * g + 8 * q, acc[q]);
    }
  }
}
#endif

// The group words for the AVX2 kernels (none where they do not run).
std::vector<philox::GroupWords> group_words(std::uint64_t seed, index_t groups) {
  return philox::cpu_has_avx2() ? philox::group_table(seed, 0, groups)
                                : std::vector<philox::GroupWords>();
}

void check_common(const char* op, int64_t seed, c10::string_view dist) {
  TORCH_CHECK_VALUE(seed >= 0, op, ": seed must be in [0, 2**63), got ", seed);
  TORCH_CHECK_VALUE(dist == "gaussian" || dist == "rademacher", op,
                    ": dist must be 'gaussian' or 'rademacher', got '", std::string(dist), "'");
}

void check_vector(const char* op, const char* name, const at::Tensor& t, const char* doc) {
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be a 1-D tensor (", doc, "), got shape ",
                    t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
                   op, ": ", name, " must have a floating dtype (float32, float16, bfloat16, "
                   "float64), got ", dt);
}

at::Tensor random_subspace_expand_cpu(const at::Tensor& alpha, int64_t seed, int64_t D,
                                      double scale, c10::string_view dist,
                                      const std::optional<at::Tensor>& base) {
  constexpr const char* op = "random_subspace_expand";
  check_vector(op, "alpha", alpha, "d: the coordinates");
  check_common(op, seed, dist);
  TORCH_CHECK_VALUE(D >= 0, op, ": D must be >= 0, got ", D);
  const bool f64 = alpha.scalar_type() == at::kDouble;
  if (base) {
    check_vector(op, "base", *base, "D: the point the subspace passes through");
    TORCH_CHECK_VALUE(base->size(0) == D, op, ": D and base must have the same length, got ", D,
                      " and ", base->size(0));
    TORCH_CHECK_VALUE(base->device() == alpha.device(), op, ": alpha and base must have the same "
                      "device, got alpha: ", alpha.device(), ", base: ", base->device());
    TORCH_CHECK_TYPE(f64 == (base->scalar_type() == at::kDouble), op, ": float64 inputs must all "
                     "be float64 (alpha: ", alpha.scalar_type(), ", base: ", base->scalar_type(), ")");
  }
  const auto acc = f64 ? at::kDouble : at::kFloat;
  const bool rademacher = dist == "rademacher";
  const index_t d = alpha.size(0), groups = (d + 3) / 4;
  // s α, zero-padded to whole column groups (Ω's entries are finite: 0 · Ω = 0).
  at::Tensor a = at::zeros({4 * groups}, alpha.options().dtype(acc));
  a.narrow(0, 0, d).copy_(alpha).mul_(scale);
  at::Tensor b = base ? base->to(acc).contiguous() : at::Tensor();
  at::Tensor w = at::empty({D}, alpha.options().dtype(acc));
  const auto s = static_cast<std::uint64_t>(seed);
  const std::vector<philox::GroupWords> gw = group_words(s, groups);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), op, [&] {
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = base ? b.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* wp = w.data_ptr<scalar_t>();
    // Tasks of about 2^14 entries, whole batches of 8 rows.
    const index_t batches = (D + 7) / 8;
    at::parallel_for(0, batches, std::max<index_t>(1, (1 << 11) / std::max<index_t>(d, 1)),
                     [&](index_t begin, index_t end) {
      const index_t r0 = 8 * begin, r1 = std::min(D, 8 * end);
#if LK_X86
      if (!gw.empty())
        return expand_range_avx2<scalar_t>(s, ap, groups, gw.data(), bp, rademacher, wp, r0, r1);
#endif
      expand_range_base<scalar_t>(s, ap, groups, bp, rademacher, wp, r0, r1);
    });
  });
  return base && base->scalar_type() != acc ? w.to(base->scalar_type()) : w;
}

at::Tensor random_subspace_project_cpu(const at::Tensor& g, int64_t seed, int64_t d, double scale,
                                       c10::string_view dist) {
  constexpr const char* op = "random_subspace_project";
  check_vector(op, "g", g, "D: the vector to project");
  check_common(op, seed, dist);
  TORCH_CHECK_VALUE(d >= 0, op, ": d must be >= 0, got ", d);
  const auto acc = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool rademacher = dist == "rademacher";
  const index_t D = g.size(0), groups = (d + 3) / 4;
  const index_t blocks = (groups + kBlock - 1) / kBlock;
  // Row chunks of whole batches of 8: a fixed split (not the thread count's), so the sums are
  // the same bits on any machine; at most 16 partial c's.
  const index_t chunk = 8 * ((std::max<index_t>(1024, (D + 15) / 16) + 7) / 8);
  const index_t chunks = std::max<index_t>(1, (D + chunk - 1) / chunk);
  at::Tensor v = g.to(acc).contiguous();
  at::Tensor partial = at::empty({chunks, 4 * groups}, g.options().dtype(acc));
  const auto s = static_cast<std::uint64_t>(seed);
  const std::vector<philox::GroupWords> gw = group_words(s, groups);
  AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), op, [&] {
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    scalar_t* pp = partial.data_ptr<scalar_t>();
    at::parallel_for(0, chunks * blocks, 1, [&](index_t begin, index_t end) {
      std::vector<scalar_t> lanes(32 * kBlock);
      for (index_t task = begin; task < end; ++task) {
        const index_t ch = task / blocks, g0 = (task % blocks) * kBlock;
        const index_t r0 = ch * chunk, r1 = std::min(D, r0 + chunk);
        const index_t ng = std::min(kBlock, groups - g0);
#if LK_X86
        if (!gw.empty())
          project_block_avx2<scalar_t>(s, vp, r0, r1, gw.data() + g0, ng, rademacher,
                                       lanes.data());
        else
#endif
          project_block_base<scalar_t>(s, vp, r0, r1, g0, ng, rademacher, lanes.data());
        // Column 4 g + q of this block.
        scalar_t* out = pp + ch * 4 * groups + 4 * g0;
        for (index_t j = 0; j < 4 * ng; ++j) out[j] = lane_sum(lanes.data() + 8 * j);
      }
    });
  });
  at::Tensor c = partial[0];
  for (index_t ch = 1; ch < chunks; ++ch) c.add_(partial[ch]);  // in order
  return c.narrow(0, 0, d).mul(scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_kernels, CPU, m) {
  m.impl("random_subspace_expand", &random_subspace_expand_cpu);
  m.impl("random_subspace_project", &random_subspace_project_cpu);
}

}  // namespace lowrank
