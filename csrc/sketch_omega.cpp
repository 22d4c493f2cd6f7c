// lowrank_kernels::sketch_omega's CPU kernel, registered on the public schema (declared in
// lowrank_kernels/ops/sketch_omega.py): Ω[rows, col_offset + 0:k] (float32) from the
// counter-based definition in lowrank/philox.h, one Philox call per 4 columns. The (row, column
// group) pairs of a block of rows are taken kLanes at a time in plain arrays, so that the
// compiler vectorizes Philox and the branch-free float32 Box–Muller across them; blocks of
// rows in parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#if defined(__SSE__)
#include <immintrin.h>
#endif

#include "lowrank/hd.h"
#include "lowrank/philox.h"

namespace lowrank {
namespace {

constexpr int kLanes = 16;  // (row, group) pairs per batch: 4 SSE / 2 AVX vectors

// v = sqrt(v) lane by lane, correctly rounded (SSE sqrtps on x86-64, else std::sqrt).
void sqrt_lanes(float (&v)[kLanes]) {
#if defined(__SSE__)
  static_assert(kLanes % 4 == 0);
  for (int t = 0; t < kLanes; t += 4) _mm_storeu_ps(v + t, _mm_sqrt_ps(_mm_loadu_ps(v + t)));
#else
  for (float& x : v) x = std::sqrt(x);
#endif
}

// Ω[rows[a], 4 g0 + 4 t + q] of pairs t = 0 .. kLanes-1 into z[q][t] (the row of pair t in
// lo[t], hi[t]; its group g[t]).
void omega_batch(std::uint64_t seed, const std::uint32_t* g, const std::uint32_t* lo,
                 const std::uint32_t* hi, bool rademacher, float (&z)[4][kLanes]) {
  std::uint32_t x[4][kLanes];
  for (int t = 0; t < kLanes; ++t) {
    const philox::Block4 w = philox::philox4x32_10(
        {{g[t], lo[t], hi[t], 0u}}, static_cast<std::uint32_t>(seed),
        static_cast<std::uint32_t>(seed >> 32));
    for (int q = 0; q < 4; ++q) x[q][t] = w.x[q];
  }
  if (rademacher) {
    for (int q = 0; q < 4; ++q)
      for (int t = 0; t < kLanes; ++t) z[q][t] = 1.0f - 2.0f * static_cast<float>(x[q][t] >> 31);
    return;
  }
  // philox::box_muller of pairs (x0, x1) and (x2, x3), step by step: a libm sqrtf call
  // (errno) would keep the compiler from vectorizing the loop around it.
  float r[2][kLanes], c[2][kLanes], s[2][kLanes];
  for (int p = 0; p < 2; ++p)
    for (int t = 0; t < kLanes; ++t) {
      r[p][t] = philox::radius_squared(x[2 * p][t]);
      philox::cos_sin(x[2 * p + 1][t], c[p][t], s[p][t]);
    }
  sqrt_lanes(r[0]);
  sqrt_lanes(r[1]);
  for (int p = 0; p < 2; ++p)
    for (int t = 0; t < kLanes; ++t) {
      z[2 * p][t] = r[p][t] * c[p][t];
      z[2 * p + 1][t] = r[p][t] * s[p][t];
    }
}

at::Tensor sketch_omega_cpu(const at::Tensor& rows, int64_t k, int64_t seed,
                            c10::string_view dist, int64_t col_offset) {
  constexpr const char* op = "sketch_omega";
  TORCH_CHECK_VALUE(rows.dim() == 1, op, ": rows must be a 1-D tensor (row indices i of Ω), "
                    "got shape ", rows.sizes());
  TORCH_CHECK_TYPE(rows.scalar_type() == at::kLong, op, ": rows must be int64, got ",
                   rows.scalar_type());
  TORCH_CHECK_VALUE(k >= 0, op, ": k must be >= 0, got ", k);
  TORCH_CHECK_VALUE(seed >= 0, op, ": seed must be in [0, 2**63), got ", seed);
  TORCH_CHECK_VALUE(dist == "gaussian" || dist == "rademacher", op,
                    ": dist must be 'gaussian' or 'rademacher', got '", std::string(dist), "'");
  const bool rademacher = dist == "rademacher";
  TORCH_CHECK_VALUE(col_offset >= 0 && col_offset % 4 == 0, op,
                    ": col_offset must be a multiple of 4 and >= 0, got ", col_offset);
  const at::Tensor r = rows.contiguous();
  const index_t n = r.size(0);
  TORCH_CHECK_VALUE(n == 0 || r.min().item<int64_t>() >= 0, op, ": rows must be >= 0");
  at::Tensor out = at::empty({n, k}, rows.options().dtype(at::kFloat));
  if (n == 0 || k == 0) return out;
  const int64_t* idx = r.const_data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  const index_t groups = (k + 3) / 4;
  const auto g_first = static_cast<std::uint64_t>(col_offset / 4);
  // About 16k entries per task.
  at::parallel_for(0, n, std::max<index_t>(1, (1 << 14) / k), [&](index_t begin, index_t end) {
    std::uint32_t g[kLanes], lo[kLanes], hi[kLanes];
    float* dst[kLanes];
    int width[kLanes];
    float z[4][kLanes];
    index_t a = begin, gr = 0;  // the next (row, group) pair
    while (a < end) {
      int lanes = 0;
      for (; lanes < kLanes && a < end; ++lanes) {
        const auto i = static_cast<std::uint64_t>(idx[a]);
        g[lanes] = static_cast<std::uint32_t>(g_first + gr);
        lo[lanes] = static_cast<std::uint32_t>(i);
        hi[lanes] = static_cast<std::uint32_t>(i >> 32);
        dst[lanes] = o + a * k + 4 * gr;
        width[lanes] = static_cast<int>(std::min<index_t>(4, k - 4 * gr));
        if (++gr == groups) gr = 0, ++a;
      }
      for (int t = lanes; t < kLanes; ++t) g[t] = lo[t] = hi[t] = 0;  // unused lanes
      omega_batch(static_cast<std::uint64_t>(seed), g, lo, hi, rademacher, z);
      for (int t = 0; t < lanes; ++t)
        for (int q = 0; q < width[t]; ++q) dst[t][q] = z[q][t];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_kernels, CPU, m) { m.impl("sketch_omega", &sketch_omega_cpu); }

}  // namespace lowrank
