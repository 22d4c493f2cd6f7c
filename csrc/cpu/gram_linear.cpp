// CPU kernel of lowrank_native::gram_linear: K = (A A^T + bias) ⊙ (E E^T), fp32 accumulation.
// Only the tiles on and above the diagonal are computed (each mirrored): the two inner-
// product tiles come from the CPU BLAS (at::mm: what it does well), the combine is the
// shared host/device core that the CUDA kernel also runs, fused while the tiles are in cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "lowrank/checks.h"
#include "lowrank/gram_linear_core.h"

namespace lowrank {
namespace {

// Rows of K per task. One task for B <= kTile (no extra flops over a full GEMM); above it,
// the upper-triangle tiles save up to half the flops of (A A^T) ⊙ (E E^T).
constexpr index_t kTile = 256;

void gram_linear_tiles(const at::Tensor& A, const at::Tensor& E, bool bias, at::Tensor& K) {
  const index_t B = A.size(0);
  const index_t tiles = core::tile_count(B, kTile);
  std::vector<std::pair<index_t, index_t>> pairs;  // (ti, tj), ti <= tj: the upper triangle
  for (index_t ti = 0; ti < tiles; ++ti)
    for (index_t tj = ti; tj < tiles; ++tj) pairs.emplace_back(ti, tj);
  float* k_out = K.data_ptr<float>();
  at::parallel_for(0, static_cast<index_t>(pairs.size()), 1, [&](index_t begin, index_t end) {
    for (index_t p = begin; p < end; ++p) {
      const index_t ri = pairs[p].first * kTile, rj = pairs[p].second * kTile;
      const index_t ni = std::min(kTile, B - ri), nj = std::min(kTile, B - rj);
      const at::Tensor ga = at::mm(A.narrow(0, ri, ni), A.narrow(0, rj, nj).t()).contiguous();
      const at::Tensor ge = at::mm(E.narrow(0, ri, ni), E.narrow(0, rj, nj).t()).contiguous();
      const float* a = ga.const_data_ptr<float>();
      const float* e = ge.const_data_ptr<float>();
      for (index_t r = 0; r < ni; ++r) {
        for (index_t c = 0; c < nj; ++c) {
          const index_t gi = ri + r, gj = rj + c;
          if (gi > gj) continue;
          const float v = core::gram_linear_entry(a[r * nj + c], e[r * nj + c], bias);
          k_out[gi * B + gj] = v;
          k_out[gj * B + gi] = v;
        }
      }
    }
  });
}

at::Tensor gram_linear_cpu(const at::Tensor& A, const at::Tensor& E, bool bias) {
  constexpr const char* op = "lowrank_native::gram_linear";
  check_rank(A, 2, op, "A", "B x d_in");
  check_rank(E, 2, op, "E", "B x d_out");
  check_same_rows(A, E, op, "A", "E");
  check_same_device_dtype(A, E, op, "A", "E");
  check_float_dtype(A, /*allow_bf16=*/false, op, "A");
  TORCH_CHECK(A.device().is_cpu(), op, ": A must be a CPU tensor for the CPU kernel, got ",
              A.device());
  at::Tensor K = at::empty({A.size(0), A.size(0)}, A.options().dtype(at::kFloat));
  if (A.size(0) == 0) return K;
  // fp16 inputs are widened once (exact), so every product accumulates in fp32.
  gram_linear_tiles(A.to(at::kFloat), E.to(at::kFloat), bias, K);
  return K;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_native, CPU, m) { m.impl("gram_linear", &gram_linear_cpu); }

}  // namespace lowrank
