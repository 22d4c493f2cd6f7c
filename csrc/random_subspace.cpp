// lowrank_kernels::random_subspace_expand / ::random_subspace_project, CPU kernels registered on
// the public schemas (declared in lowrank_kernels/ops/random_subspace.py): the random basis
// P = s·Ω (D×d) is generated kLanes Philox counters at a time (lowrank/philox_lanes.h: the
// same Ω bit for bit as philox.h) and consumed at once, never stored:
//
//   expand   w_i = base_i + Σ_j Ω_ij (s α_j)   lanes = 16 consecutive rows i, one column
//                                               group (4 columns) after another
//   project  c_j = s Σ_i Ω_ij g_i              lanes = 16 column groups (64 columns), one
//                                               row after another; fixed row chunks summed
//                                               in order (the same bits for any thread count)
//
// Accumulation in float32 (float64 for float64 inputs; Ω entries are float32, exact in both).
// AVX2 where the CPU has it (runtime dispatch), the baseline ISA otherwise; tasks in parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>

#include "lowrank/hd.h"
#include "lowrank/philox_lanes.h"

namespace lowrank {
namespace {

using philox::Isa;
using philox::kLanes;

// acc[t] += Σ_q Ω[row0 + t, 4 gr + q] a[4 gr + q] over the column groups gr < groups (a
// zero-padded to 4 groups entries); rows are lanes.
template <Isa isa, class acc_t>
LK_INLINE void expand_rows(std::uint64_t seed, index_t row0, const acc_t* a, index_t groups,
                           bool rademacher, acc_t (&acc)[kLanes]) {
  std::uint32_t g[kLanes], lo[kLanes], hi[kLanes];
  for (int t = 0; t < kLanes; ++t) {
    const auto i = static_cast<std::uint64_t>(row0 + t);
    lo[t] = static_cast<std::uint32_t>(i);
    hi[t] = static_cast<std::uint32_t>(i >> 32);
    acc[t] = 0;
  }
  float z[4][kLanes];
  for (index_t gr = 0; gr < groups; ++gr) {
    for (int t = 0; t < kLanes; ++t) g[t] = static_cast<std::uint32_t>(gr);
    philox::omega_lanes<isa>(seed, g, lo, hi, rademacher, z);
    const acc_t* ag = a + 4 * gr;
    for (int t = 0; t < kLanes; ++t)
      acc[t] = acc[t] + static_cast<acc_t>(z[0][t]) * ag[0] + static_cast<acc_t>(z[1][t]) * ag[1] +
               static_cast<acc_t>(z[2][t]) * ag[2] + static_cast<acc_t>(z[3][t]) * ag[3];
  }
}

// w[i] = (base[i] +) Σ_j Ω_ij a_j for rows [r0, r1), kLanes rows at a time.
template <Isa isa, class acc_t>
void expand_range(std::uint64_t seed, const acc_t* a, index_t groups, const acc_t* base,
                  bool rademacher, acc_t* w, index_t r0, index_t r1) {
  acc_t acc[kLanes];
  for (index_t i0 = r0; i0 < r1; i0 += kLanes) {
    expand_rows<isa>(seed, i0, a, groups, rademacher, acc);
    const int n = static_cast<int>(std::min<index_t>(kLanes, r1 - i0));
    for (int t = 0; t < n; ++t) w[i0 + t] = base ? base[i0 + t] + acc[t] : acc[t];
  }
}

// acc[q][t] = Σ_{r0 <= i < r1} g_i Ω[i, 4 (g0 + t) + q]; column groups are lanes.
template <Isa isa, class acc_t>
void project_range(std::uint64_t seed, const acc_t* v, index_t r0, index_t r1, index_t g0,
                   bool rademacher, acc_t (&acc)[4][kLanes]) {
  std::uint32_t g[kLanes], lo[kLanes], hi[kLanes];
  for (int t = 0; t < kLanes; ++t) g[t] = static_cast<std::uint32_t>(g0 + t);
  for (int q = 0; q < 4; ++q)
    for (int t = 0; t < kLanes; ++t) acc[q][t] = 0;
  float z[4][kLanes];
  for (index_t i = r0; i < r1; ++i) {
    const auto row = static_cast<std::uint64_t>(i);
    for (int t = 0; t < kLanes; ++t) {
      lo[t] = static_cast<std::uint32_t>(row);
      hi[t] = static_cast<std::uint32_t>(row >> 32);
    }
    philox::omega_lanes<isa>(seed, g, lo, hi, rademacher, z);
    const acc_t vi = v[i];
    for (int q = 0; q < 4; ++q)
      for (int t = 0; t < kLanes; ++t) acc[q][t] = acc[q][t] + vi * static_cast<acc_t>(z[q][t]);
  }
}

// The two ISAs of each range kernel, everything inlined into them.
template <class acc_t>
LK_TARGET_AVX2 LK_FLATTEN void expand_range_avx2(std::uint64_t seed, const acc_t* a,
                                                 index_t groups, const acc_t* base, bool rad,
                                                 acc_t* w, index_t r0, index_t r1) {
  expand_range<Isa::kAvx2>(seed, a, groups, base, rad, w, r0, r1);
}
template <class acc_t>
LK_FLATTEN void expand_range_base(std::uint64_t seed, const acc_t* a, index_t groups,
                                  const acc_t* base, bool rad, acc_t* w, index_t r0, index_t r1) {
  expand_range<Isa::kBase>(seed, a, groups, base, rad, w, r0, r1);
}
template <class acc_t>
LK_TARGET_AVX2 LK_FLATTEN void project_range_avx2(std::uint64_t seed, const acc_t* v, index_t r0,
                                                  index_t r1, index_t g0, bool rad,
                                                  acc_t (&acc)[4][kLanes]) {
  project_range<Isa::kAvx2>(seed, v, r0, r1, g0, rad, acc);
}
template <class acc_t>
LK_FLATTEN void project_range_base(std::uint64_t seed, const acc_t* v, index_t r0, index_t r1,
                                   index_t g0, bool rad, acc_t (&acc)[4][kLanes]) {
  project_range<Isa::kBase>(seed, v, r0, r1, g0, rad, acc);
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
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), op, [&] {
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = base ? b.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* wp = w.data_ptr<scalar_t>();
    const bool avx2 = philox::cpu_has_avx2();
    const auto s = static_cast<std::uint64_t>(seed);
    // Tasks of about 2^14 entries, whole lane batches.
    const index_t grain = kLanes * std::max<index_t>(1, (1 << 14) / (kLanes * std::max<index_t>(d, 1)));
    at::parallel_for(0, (D + kLanes - 1) / kLanes, std::max<index_t>(1, grain / kLanes),
                     [&](index_t begin, index_t end) {
      const index_t r0 = begin * kLanes, r1 = std::min(D, end * kLanes);
      if (avx2)
        expand_range_avx2<scalar_t>(s, ap, groups, bp, rademacher, wp, r0, r1);
      else
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
  const index_t blocks = (groups + kLanes - 1) / kLanes;  // kLanes column groups each
  // Row chunks: a fixed split (not the thread count's), so the sums are the same bits on any
  // machine; at most 16 partial c's.
  const index_t chunk = std::max<index_t>(1024, (D + 15) / 16);
  const index_t chunks = std::max<index_t>(1, (D + chunk - 1) / chunk);
  at::Tensor v = g.to(acc).contiguous();
  at::Tensor partial = at::empty({chunks, blocks * 4 * kLanes}, g.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), op, [&] {
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    scalar_t* pp = partial.data_ptr<scalar_t>();
    const bool avx2 = philox::cpu_has_avx2();
    const auto s = static_cast<std::uint64_t>(seed);
    at::parallel_for(0, chunks * blocks, 1, [&](index_t begin, index_t end) {
      scalar_t acc_block[4][kLanes];
      for (index_t task = begin; task < end; ++task) {
        const index_t ch = task / blocks, bl = task % blocks;
        const index_t r0 = ch * chunk, r1 = std::min(D, r0 + chunk);
        if (avx2)
          project_range_avx2<scalar_t>(s, vp, r0, r1, bl * kLanes, rademacher, acc_block);
        else
          project_range_base<scalar_t>(s, vp, r0, r1, bl * kLanes, rademacher, acc_block);
        // Column j = 4 (g0 + t) + q of this block.
        scalar_t* out = pp + ch * blocks * 4 * kLanes + bl * 4 * kLanes;
        for (int t = 0; t < kLanes; ++t)
          for (int q = 0; q < 4; ++q) out[4 * t + q] = acc_block[q][t];
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
