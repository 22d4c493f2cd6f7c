// CPU kernel of lowrank_native::gram_linear: K = (A A^T + bias) ⊙ (E E^T), fp32 accumulation,
// only the tiles on and above the diagonal computed, each mirrored. The arithmetic is the
// shared core (lowrank/gram_linear_core.h) that the CUDA kernel runs per thread.
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

constexpr int kTile = core::kGramTile;  // rows of K per task
constexpr int kChunk = 128;             // k-depth of a cache-resident panel
constexpr int kMicro = 8;               // micro-tile edge (8 floats: one AVX register row)

// panel[k * kTile + r] = float(X[row0 + r, k0 + k]) for r < nrows, zero-padded to kTile.
template <typename scalar_t>
void pack_panel(const scalar_t* X, index_t s0, index_t s1, index_t row0, index_t nrows,
                index_t k0, int kc, float* panel) {
  std::fill(panel, panel + static_cast<index_t>(kc) * kTile, 0.0f);
  for (index_t r = 0; r < nrows; ++r) {
    const scalar_t* row = X + (row0 + r) * s0 + k0 * s1;
    for (int k = 0; k < kc; ++k) panel[k * kTile + r] = static_cast<float>(row[k * s1]);
  }
}

// acc (kTile x kTile) = X[ri:ri+ni] X[rj:rj+nj]^T, micro-tiles below the diagonal skipped
// when the tile is a diagonal one (ri == rj).
template <typename scalar_t>
void tile_inner_products(const scalar_t* X, index_t s0, index_t s1, index_t d, index_t ri,
                         index_t ni, index_t rj, index_t nj, float* acc, float* pi, float* pj) {
  std::fill(acc, acc + kTile * kTile, 0.0f);
  const bool diagonal = ri == rj;
  for (index_t k0 = 0; k0 < d; k0 += kChunk) {
    const int kc = static_cast<int>(std::min<index_t>(kChunk, d - k0));
    pack_panel(X, s0, s1, ri, ni, k0, kc, pi);
    const float* pj_used = pi;
    if (!diagonal) {
      pack_panel(X, s0, s1, rj, nj, k0, kc, pj);
      pj_used = pj;
    }
    for (int mi = 0; mi < ni; mi += kMicro) {
      for (int mj = diagonal ? mi : 0; mj < nj; mj += kMicro) {
        float micro[kMicro][kMicro];
        for (int r = 0; r < kMicro; ++r)
          for (int c = 0; c < kMicro; ++c) micro[r][c] = acc[(mi + r) * kTile + mj + c];
        core::outer_product_accumulate<kMicro, kMicro>(pi + mi, pj_used + mj, kc, kTile, micro);
        for (int r = 0; r < kMicro; ++r)
          for (int c = 0; c < kMicro; ++c) acc[(mi + r) * kTile + mj + c] = micro[r][c];
      }
    }
  }
}

template <typename scalar_t>
void gram_linear_cpu_impl(const at::Tensor& A, const at::Tensor& E, bool bias, at::Tensor& K) {
  const index_t B = A.size(0);
  const index_t tiles = core::tile_count(B, kTile);
  std::vector<std::pair<index_t, index_t>> pairs;  // (ti, tj), ti <= tj: the upper triangle
  for (index_t ti = 0; ti < tiles; ++ti)
    for (index_t tj = ti; tj < tiles; ++tj) pairs.emplace_back(ti, tj);

  const scalar_t* a = A.const_data_ptr<scalar_t>();
  const scalar_t* e = E.const_data_ptr<scalar_t>();
  float* k_out = K.data_ptr<float>();
  at::parallel_for(0, static_cast<index_t>(pairs.size()), 1, [&](index_t begin, index_t end) {
    std::vector<float> acc_a(kTile * kTile), acc_e(kTile * kTile);
    std::vector<float> pi(kChunk * kTile), pj(kChunk * kTile);
    for (index_t p = begin; p < end; ++p) {
      const index_t ri = pairs[p].first * kTile, rj = pairs[p].second * kTile;
      const index_t ni = std::min<index_t>(kTile, B - ri), nj = std::min<index_t>(kTile, B - rj);
      tile_inner_products(a, A.stride(0), A.stride(1), A.size(1), ri, ni, rj, nj, acc_a.data(),
                          pi.data(), pj.data());
      tile_inner_products(e, E.stride(0), E.stride(1), E.size(1), ri, ni, rj, nj, acc_e.data(),
                          pi.data(), pj.data());
      for (index_t r = 0; r < ni; ++r) {
        for (index_t c = 0; c < nj; ++c) {
          const index_t gi = ri + r, gj = rj + c;
          if (gi > gj) continue;
          const float v =
              core::gram_linear_entry(acc_a[r * kTile + c], acc_e[r * kTile + c], bias);
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
  if (A.scalar_type() == at::kHalf) {
    gram_linear_cpu_impl<at::Half>(A, E, bias, K);
  } else {
    gram_linear_cpu_impl<float>(A, E, bias, K);
  }
  return K;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_native, CPU, m) { m.impl("gram_linear", &gram_linear_cpu); }

}  // namespace lowrank
