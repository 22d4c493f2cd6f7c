// lowrank_kernels::sketch_omega's CPU kernel, registered on the public schema (declared in
// lowrank_kernels/ops/sketch_omega.py): Ω[rows, col_offset + 0:k] (float32) from the
// counter-based definition in lowrank/philox.h, one Philox call per 4 columns. The (row, column
// group) pairs of a block of rows are taken kLanes at a time (lowrank/philox_lanes.h: Philox and
// the branch-free float32 Box–Muller vectorized across them, AVX2 where the CPU has it); blocks
// of rows in parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "lowrank/hd.h"
#include "lowrank/philox_lanes.h"

namespace lowrank {
namespace {

using philox::Isa;
using philox::kLanes;

// The rows [begin, end) of out (n × k): their (row, column group) pairs kLanes at a time.
template <Isa isa>
void omega_rows(std::uint64_t seed, const int64_t* idx, index_t k, std::uint64_t g_first,
                bool rademacher, float* o, index_t begin, index_t end) {
  const index_t groups = (k + 3) / 4;
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
    philox::omega_lanes<isa>(seed, g, lo, hi, rademacher, z);
    for (int t = 0; t < lanes; ++t)
      for (int q = 0; q < width[t]; ++q) dst[t][q] = z[q][t];
  }
}

LK_TARGET_AVX2 LK_FLATTEN void omega_rows_avx2(std::uint64_t seed, const int64_t* idx, index_t k,
                                               std::uint64_t g_first, bool rademacher, float* o,
                                               index_t begin, index_t end) {
  omega_rows<Isa::kAvx2>(seed, idx, k, g_first, rademacher, o, begin, end);
}

LK_FLATTEN void omega_rows_base(std::uint64_t seed, const int64_t* idx, index_t k,
                                std::uint64_t g_first, bool rademacher, float* o, index_t begin,
                                index_t end) {
  omega_rows<Isa::kBase>(seed, idx, k, g_first, rademacher, o, begin, end);
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
  const auto g_first = static_cast<std::uint64_t>(col_offset / 4);
  const auto s = static_cast<std::uint64_t>(seed);
  const bool avx2 = philox::cpu_has_avx2();
  // About 16k entries per task.
  at::parallel_for(0, n, std::max<index_t>(1, (1 << 14) / k), [&](index_t begin, index_t end) {
    if (avx2)
      omega_rows_avx2(s, idx, k, g_first, rademacher, o, begin, end);
    else
      omega_rows_base(s, idx, k, g_first, rademacher, o, begin, end);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_kernels, CPU, m) { m.impl("sketch_omega", &sketch_omega_cpu); }

}  // namespace lowrank
