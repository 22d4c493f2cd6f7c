// The weighted affine-parameter gradients of a batch or group norm, for the weighted backward
// (lowrank_kernels/capture/_weighted.py): for its output gradient g and input x (B, C, *) and
// per-sample weights w, wb (B,),
//
//   gamma[c] = Σ_n w[n] invstd[s] Σ_k g[n, c, k] (x[n, c, k] − mean[s]),
//   beta[c]  = Σ_n wb[n] Σ_k g[n, c, k],
//
// with s = (n or 0, c / (C / G)): the statistics the forward normalized with, given as
// (Bm, G) with Bm ∈ {1, B} and G | C — (1, C) for a batch norm (the batch's or the running
// ones), (B, groups) for a group norm. One read of g and x, in 8 partial sums per (sample,
// channel) row; the rows' sums are then weighted over n in sample order (deterministic for
// any thread count). lowrank_kernels._C.capture_norm_affine_sums (csrc/capture_py.cpp),
// private to the capture (CPU).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>

#include "lowrank/capture_nodes.h"
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

}  // namespace

namespace lowrank::capture {

std::tuple<at::Tensor, at::Tensor> norm_affine_sums(const at::Tensor& g, const at::Tensor& x,
                                                    const at::Tensor& mean,
                                                    const at::Tensor& invstd,
                                                    const at::Tensor& w, const at::Tensor& wb) {
  TORCH_CHECK(g.dim() >= 2 && g.sizes() == x.sizes(),
              "norm_affine_sums: g and x must have one shape (B, C, ...), got ", g.sizes(),
              " and ", x.sizes());
  TORCH_CHECK(g.scalar_type() == x.scalar_type() && mean.scalar_type() == x.scalar_type() &&
                  invstd.scalar_type() == x.scalar_type(),
              "norm_affine_sums: g, x, mean and invstd must have one dtype");
  const int64_t B = x.size(0), C = x.size(1), K = B * C == 0 ? 0 : x.numel() / (B * C);
  TORCH_CHECK(mean.dim() == 2 && mean.sizes() == invstd.sizes() &&
                  (mean.size(0) == 1 || mean.size(0) == B) && mean.size(1) > 0 &&
                  C % mean.size(1) == 0,
              "norm_affine_sums: mean and invstd must be (1 or B, G) with G dividing C, got ",
              mean.sizes(), " and ", invstd.sizes(), " for C = ", C);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == B && wb.sizes() == w.sizes(),
              "norm_affine_sums: w and wb must be (B,) with B = ", B, ", got ", w.sizes(),
              " and ", wb.sizes());
  const auto gc = g.contiguous(), xc = x.contiguous();
  const auto mc = mean.contiguous(), ic = invstd.contiguous();
  const auto wc = w.to(x.scalar_type()).contiguous(), wbc = wb.to(x.scalar_type()).contiguous();
  auto rows_gamma = at::empty({B, C}, x.options()), rows_beta = at::empty({B, C}, x.options());
  auto gamma = at::zeros({C}, x.options()), beta = at::zeros({C}, x.options());
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "norm_affine_sums", [&] {
    const scalar_t *gp = gc.data_ptr<scalar_t>(), *xp = xc.data_ptr<scalar_t>();
    const scalar_t *mp = mc.data_ptr<scalar_t>(), *ip = ic.data_ptr<scalar_t>();
    scalar_t *rg = rows_gamma.data_ptr<scalar_t>(), *rb = rows_beta.data_ptr<scalar_t>();
    at::parallel_for(0, B * C, grain, [&](int64_t lo, int64_t hi) {
      channel_sums_rows(gp, xp, mp, ip, rg, rb, lo, hi, C, K, mean.size(0), mean.size(1));
    });
    const scalar_t *wp = wc.data_ptr<scalar_t>(), *wbp = wbc.data_ptr<scalar_t>();
    scalar_t *gam = gamma.data_ptr<scalar_t>(), *bet = beta.data_ptr<scalar_t>();
    for (int64_t n = 0; n < B; ++n)
      for (int64_t c = 0; c < C; ++c) {
        gam[c] += wp[n] * rg[n * C + c];
        bet[c] += wbp[n] * rb[n * C + c];
      }
  });
  return {gamma, beta};
}

}  // namespace lowrank::capture
