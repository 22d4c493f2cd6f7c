// CPU kernel of lowrank_kernels::sketch_omega: Ω[rows, col_offset + 0:k] (float32) from the counter-based
// definition in lowrank/philox.h, one Philox call per 4 columns, rows in parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "lowrank/hd.h"
#include "lowrank/philox.h"

namespace lowrank {
namespace {

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
  at::parallel_for(0, n, 64, [&](index_t begin, index_t end) {
    float group[4];
    for (index_t a = begin; a < end; ++a) {
      const auto i = static_cast<std::uint64_t>(idx[a]);
      for (index_t g = 0; g < groups; ++g) {
        philox::omega_group(static_cast<std::uint64_t>(seed), i,
                            static_cast<std::uint64_t>(col_offset / 4 + g), rademacher, group);
        const index_t j0 = 4 * g, width = std::min<index_t>(4, k - j0);
        for (index_t q = 0; q < width; ++q) o[a * k + j0 + q] = group[q];
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_kernels, CPU, m) { m.impl("sketch_omega", &sketch_omega_cpu); }

}  // namespace lowrank
