// lowrank_kernels::sketch_matmul's CPU kernel, registered on the public schema (declared in
// lowrank_kernels/ops/sketch_matmul.py):
//
//   transpose=False:  Y = M Ω  (m × k),  Ω_ij = f(seed, row_offset + i, j), i < n
//   transpose=True:   Y = Ωᵀ M (k × n),  i < m
//
// Ω is generated in blocks of rows, as Ωᵀ (k × nb, about 2^18 entries: 8 rows × 4 column
// groups per step with AVX2, lowrank/philox_lanes.h omega_rows_avx2; 8 rows × 2 groups with the
// baseline ISA, the same bits), in parallel over row batches, and each block goes to one GEMM
// (at::mm_out, then addmm_): the GEMM beats a fused generate-and-dot once M has more than a
// few rows, and at a few rows the generation dominates either way. float32 (float16/bfloat16
// M computed in float32), float64 for float64 M (Ω's float32 entries exact in it).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "lowrank/hd.h"
#include "lowrank/philox_lanes.h"

namespace lowrank {
namespace {

using philox::Isa;
using philox::kLanes;

constexpr index_t kBlockEntries = 1 << 18;  // entries of Ω per GEMM

// Ωᵀ[j, b] = Ω[i0 + b, j] (ld: Ωᵀ's row stride) for the batches of 8 rows [b0, b1) of a block
// starting at row i0; k columns. Whole batches are written (ld >= 8 b1).
template <class scalar_t>
void omega_t_base(std::uint64_t seed, std::uint64_t i0, index_t k, bool rademacher,
                  scalar_t* out, index_t ld, index_t b0, index_t b1) {
  const index_t groups = (k + 3) / 4;
  float z[4][kLanes];
  for (index_t b = b0; b < b1; ++b)
    for (index_t g = 0; g < groups; g += 2) {
      philox::omega_rows_lanes<Isa::kBase>(seed, i0 + static_cast<std::uint64_t>(8 * b),
                                           static_cast<std::uint64_t>(g), rademacher, z);
      for (index_t v = 0; v < std::min<index_t>(2, groups - g); ++v)
        for (index_t q = 0; q < std::min<index_t>(4, k - 4 * (g + v)); ++q)
          for (int t = 0; t < 8; ++t)
            out[(4 * (g + v) + q) * ld + 8 * b + t] = static_cast<scalar_t>(z[q][8 * v + t]);
    }
}

#if LK_X86
LK_TARGET_AVX2 LK_INLINE void store8(float* p, __m256 z) { _mm256_storeu_ps(p, z); }
LK_TARGET_AVX2 LK_INLINE void store8(double* p, __m256 z) {
  _mm256_storeu_pd(p, _mm256_cvtps_pd(_mm256_castps256_ps128(z)));
  _mm256_storeu_pd(p + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(z, 1)));
}

template <class scalar_t>
LK_TARGET_AVX2 void omega_t_avx2(std::uint64_t seed, std::uint64_t i0, index_t k,
                                 const philox::GroupWords* gw, bool rademacher, scalar_t* out,
                                 index_t ld, index_t b0, index_t b1) {
  const philox::RoundKeys key = philox::round_keys_avx2(seed);
  const index_t groups = (k + 3) / 4;
  for (index_t b = b0; b < b1; ++b) {
    const philox::RowWords8 rows = philox::row_words_avx2(seed, i0 + static_cast<std::uint64_t>(8 * b));
    scalar_t* o = out + 8 * b;
    index_t g = 0;
    for (; g + 4 <= groups; g += 4) {
      __m256 z[4][4];
      philox::omega_rows_avx2<4>(key, &rows, 0, gw + g, 1, rademacher, z);
      for (int v = 0; v < 4; ++v)
        for (index_t q = 0; q < std::min<index_t>(4, k - 4 * (g + v)); ++q)
          store8(o + (4 * (g + v) + q) * ld, z[v][q]);
    }
    for (; g < groups; ++g) {
      __m256 z[1][4];
      philox::omega_rows_avx2<1>(key, &rows, 0, gw + g, 1, rademacher, z);
      for (index_t q = 0; q < std::min<index_t>(4, k - 4 * g); ++q)
        store8(o + (4 * g + q) * ld, z[0][q]);
    }
  }
}
#endif

at::Tensor sketch_matmul_cpu(const at::Tensor& M, int64_t k, int64_t seed, c10::string_view dist,
                             bool transpose, int64_t row_offset) {
  constexpr const char* op = "sketch_matmul";
  TORCH_CHECK_VALUE(M.dim() == 2, op, ": M must be a 2-D tensor (m x n matrix), got shape ",
                    M.sizes());
  const auto dt = M.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
                   op, ": M must have a floating dtype (float32, float16, bfloat16, float64), "
                   "got ", dt);
  TORCH_CHECK_VALUE(k >= 1, op, ": k (columns of Ω) must be >= 1, got ", k);
  TORCH_CHECK_VALUE(seed >= 0, op, ": seed must be in [0, 2**63), got ", seed);
  TORCH_CHECK_VALUE(dist == "gaussian" || dist == "rademacher", op,
                    ": dist must be 'gaussian' or 'rademacher', got '", std::string(dist), "'");
  TORCH_CHECK_VALUE(row_offset >= 0, op, ": row_offset must be >= 0, got ", row_offset);
  const bool rademacher = dist == "rademacher";
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor A = M.to(acc);  // no copy for float32 / float64: GEMMs take any strides
  const index_t inner = transpose ? M.size(0) : M.size(1);
  const index_t outer = transpose ? M.size(1) : M.size(0);
  at::Tensor Y = transpose ? at::empty({k, outer}, M.options().dtype(acc))
                           : at::empty({outer, k}, M.options().dtype(acc));
  if (inner == 0 || outer == 0) return Y.zero_();
  // Rows per block: whole batches of 8, about kBlockEntries entries.
  const index_t nb = std::min(8 * ((inner + 7) / 8),
                              8 * std::max<index_t>(1, kBlockEntries / (8 * k)));
  at::Tensor omega_t = at::empty({k, nb}, M.options().dtype(acc));
  const auto s = static_cast<std::uint64_t>(seed);
  const index_t groups = (k + 3) / 4;
  const std::vector<philox::GroupWords> gw =
      philox::cpu_has_avx2() ? philox::group_table(s, 0, groups) : std::vector<philox::GroupWords>();
  for (index_t r0 = 0; r0 < inner; r0 += nb) {
    const index_t rows = std::min(nb, inner - r0);
    const auto i0 = static_cast<std::uint64_t>(row_offset) + static_cast<std::uint64_t>(r0);
    AT_DISPATCH_FLOATING_TYPES(acc, op, [&] {
      scalar_t* o = omega_t.data_ptr<scalar_t>();
      // Tasks of about 2^14 entries.
      at::parallel_for(0, (rows + 7) / 8, std::max<index_t>(1, (1 << 11) / k),
                       [&](index_t b0, index_t b1) {
#if LK_X86
        if (!gw.empty())
          return omega_t_avx2<scalar_t>(s, i0, k, gw.data(), rademacher, o, nb, b0, b1);
#endif
        omega_t_base<scalar_t>(s, i0, k, rademacher, o, nb, b0, b1);
      });
    });
    const at::Tensor block = omega_t.narrow(1, 0, rows);  // Ω[rows]ᵀ, k × rows
    const at::Tensor a = transpose ? block : A.narrow(1, r0, rows);
    const at::Tensor b = transpose ? A.narrow(0, r0, rows) : block.t();
    if (r0 == 0)
      at::mm_out(Y, a, b);
    else
      Y.addmm_(a, b);
  }
  return Y;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_kernels, CPU, m) { m.impl("sketch_matmul", &sketch_matmul_cpu); }

}  // namespace lowrank
