// Per-sample, per-channel sums of a batch or group norm's output gradient g (B, C, *), for
// the weighted backward of its affine parameters (lowrank_kernels/capture/_weighted.py):
//
//   gamma[n, c] = invstd[s] Σ_k g[n, c, k] (x[n, c, k] − mean[s]),   beta[n, c] = Σ_k g[n, c, k]
//
// with s = (n or 0, c / (C / G)): the statistics the forward normalized with, given as
// (Bm, G) with Bm ∈ {1, B} and G | C — (1, C) for a batch norm (the batch's or the running
// ones), (B, groups) for a group norm. One read of g and x, in 8 partial sums per row.
// lowrank_kernels_capture::norm_channel_sums, a private op of the capture (CPU).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "lowrank/target_clones.h"

namespace {

// Σ_k g_k and Σ_k g_k (x_k − mu) over one (sample, channel) row, each in 8 partial sums (one
// AVX2 register of float lanes; two plain loops, which GCC vectorizes), always inlined into
// the per-target clones below.
template <typename T>
inline __attribute__((always_inline)) T row_sum(const T* g, int64_t K) {
  constexpr int Parts = 8;
  T part[Parts] = {};
  int64_t k = 0;
  for (; k + Parts <= K; k += Parts)
    for (int j = 0; j < Parts; ++j) part[j] += g[k + j];
  T s = 0;
  for (; k < K; ++k) s += g[k];
  for (int j = 0; j < Parts; ++j) s += part[j];
  return s;
}

template <typename T>
inline __attribute__((always_inline)) T row_centered_dot(const T* g, const T* x, T mu,
                                                         int64_t K) {
  constexpr int Parts = 8;
  T part[Parts] = {};
  int64_t k = 0;
  for (; k + Parts <= K; k += Parts)
    for (int j = 0; j < Parts; ++j) part[j] += g[k + j] * (x[k + j] - mu);
  T s = 0;
  for (; k < K; ++k) s += g[k] * (x[k] - mu);
  for (int j = 0; j < Parts; ++j) s += part[j];
  return s;
}

template <typename T>
inline __attribute__((always_inline)) void channel_sums_body(
    const T* g, const T* x, const T* mean, const T* invstd, T* gamma, T* beta, int64_t lo,
    int64_t hi, int64_t C, int64_t K, int64_t Bm, int64_t G) {
  const int64_t per_group = C / G;
  for (int64_t i = lo; i < hi; ++i) {
    const int64_t n = i / C, c = i % C;
    const int64_t s = (Bm == 1 ? 0 : n) * G + c / per_group;
    beta[i] = row_sum(g + i * K, K);
    gamma[i] = row_centered_dot(g + i * K, x + i * K, mean[s], K) * invstd[s];
  }
}

LOWRANK_CLONES void channel_sums_rows(const float* g, const float* x, const float* mean,
                                      const float* invstd, float* gamma, float* beta,
                                      int64_t lo, int64_t hi, int64_t C, int64_t K, int64_t Bm,
                                      int64_t G) {
  channel_sums_body(g, x, mean, invstd, gamma, beta, lo, hi, C, K, Bm, G);
}
LOWRANK_CLONES void channel_sums_rows(const double* g, const double* x, const double* mean,
                                      const double* invstd, double* gamma, double* beta,
                                      int64_t lo, int64_t hi, int64_t C, int64_t K, int64_t Bm,
                                      int64_t G) {
  channel_sums_body(g, x, mean, invstd, gamma, beta, lo, hi, C, K, Bm, G);
}

std::tuple<at::Tensor, at::Tensor> norm_channel_sums_cpu(const at::Tensor& g,
                                                         const at::Tensor& x,
                                                         const at::Tensor& mean,
                                                         const at::Tensor& invstd) {
  TORCH_CHECK(g.dim() >= 2 && g.sizes() == x.sizes(),
              "norm_channel_sums: g and x must have one shape (B, C, ...), got ", g.sizes(),
              " and ", x.sizes());
  TORCH_CHECK(g.scalar_type() == x.scalar_type() && mean.scalar_type() == x.scalar_type() &&
                  invstd.scalar_type() == x.scalar_type(),
              "norm_channel_sums: g, x, mean and invstd must have one dtype");
  const int64_t B = x.size(0), C = x.size(1), K = B * C == 0 ? 0 : x.numel() / (B * C);
  TORCH_CHECK(mean.dim() == 2 && mean.sizes() == invstd.sizes() &&
                  (mean.size(0) == 1 || mean.size(0) == B) && mean.size(1) > 0 &&
                  C % mean.size(1) == 0,
              "norm_channel_sums: mean and invstd must be (1 or B, G) with G dividing C, got ",
              mean.sizes(), " and ", invstd.sizes(), " for C = ", C);
  const auto gc = g.contiguous(), xc = x.contiguous();
  const auto mc = mean.contiguous(), ic = invstd.contiguous();
  auto gamma = at::empty({B, C}, x.options()), beta = at::empty({B, C}, x.options());
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "norm_channel_sums", [&] {
    const scalar_t *gp = gc.data_ptr<scalar_t>(), *xp = xc.data_ptr<scalar_t>();
    const scalar_t *mp = mc.data_ptr<scalar_t>(), *ip = ic.data_ptr<scalar_t>();
    scalar_t *gam = gamma.data_ptr<scalar_t>(), *bet = beta.data_ptr<scalar_t>();
    at::parallel_for(0, B * C, grain, [&](int64_t lo, int64_t hi) {
      channel_sums_rows(gp, xp, mp, ip, gam, bet, lo, hi, C, K, mean.size(0), mean.size(1));
    });
  });
  return {gamma, beta};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowrank_kernels_capture, m) {
  m.def("norm_channel_sums(Tensor g, Tensor x, Tensor mean, Tensor invstd) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lowrank_kernels_capture, CPU, m) {
  m.impl("norm_channel_sums", &norm_channel_sums_cpu);
}
