// The weighted sums of a layer norm's affine-parameter gradients over its rows, for the
// weighted backward (lowrank_kernels/capture/_weighted.py): for g, x (R, D) with R = B·T
// rows in sample-major order (row r of sample r / T), the row statistics mean, rstd (R) that
// the forward normalized with, and per-sample weights a, b (B,):
//
//   gamma[d] = Σ_r a[r / T] rstd[r] g[r, d] (x[r, d] − mean[r]),   beta[d] = Σ_r b[r / T] g[r, d]
//
// One read of g and x; each thread owns a range of columns d and sums all rows into it in
// row order (deterministic for any thread count).
// lowrank_kernels._C.capture_layer_norm_affine_sums (csrc/capture_py.cpp), private to the
// capture (CPU).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>

#include "lowrank/capture_nodes.h"
#include "lowrank/target_clones.h"

namespace {

// One row into the column sums (a plain loop over contiguous columns, which GCC vectorizes).
template <typename T>
inline __attribute__((always_inline)) void add_row(const T* __restrict__ g,
                                                   const T* __restrict__ x, T scale, T shift,
                                                   T coef, T* __restrict__ gamma,
                                                   T* __restrict__ beta, int64_t n) {
#pragma GCC ivdep
  for (int64_t j = 0; j < n; ++j) {
    gamma[j] += g[j] * (scale * x[j] + shift);
    beta[j] += coef * g[j];
  }
}

template <typename T>
inline __attribute__((always_inline)) void affine_sums_body(
    const T* g, const T* x, const T* mean, const T* rstd, const T* a, const T* b, T* gamma,
    T* beta, int64_t R, int64_t T_rows, int64_t D, int64_t lo, int64_t hi) {
  const int64_t n = hi - lo;
  std::fill(gamma + lo, gamma + hi, T(0));
  std::fill(beta + lo, beta + hi, T(0));
  for (int64_t r = 0; r < R; ++r) {
    const int64_t i = r / T_rows;
    const T scale = a[i] * rstd[r];
    add_row(g + r * D + lo, x + r * D + lo, scale, -scale * mean[r], b[i], gamma + lo,
            beta + lo, n);
  }
}

LOWRANK_CLONES void affine_sums(const float* g, const float* x, const float* mean,
                                const float* rstd, const float* a, const float* b, float* gamma,
                                float* beta, int64_t R, int64_t T_rows, int64_t D, int64_t lo,
                                int64_t hi) {
  affine_sums_body(g, x, mean, rstd, a, b, gamma, beta, R, T_rows, D, lo, hi);
}
LOWRANK_CLONES void affine_sums(const double* g, const double* x, const double* mean,
                                const double* rstd, const double* a, const double* b,
                                double* gamma, double* beta, int64_t R, int64_t T_rows, int64_t D,
                                int64_t lo, int64_t hi) {
  affine_sums_body(g, x, mean, rstd, a, b, gamma, beta, R, T_rows, D, lo, hi);
}

}  // namespace

namespace lowrank::capture {

std::tuple<at::Tensor, at::Tensor> layer_norm_affine_sums(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(g.dim() == 2 && g.sizes() == x.sizes(),
              "layer_norm_affine_sums: g and x must have one shape (R, D), got ", g.sizes(),
              " and ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(g.scalar_type() == dtype && mean.scalar_type() == dtype &&
                  rstd.scalar_type() == dtype && a.scalar_type() == dtype &&
                  b.scalar_type() == dtype,
              "layer_norm_affine_sums: g, x, mean, rstd, a and b must have one dtype");
  const int64_t R = x.size(0), D = x.size(1), B = a.numel();
  TORCH_CHECK(mean.numel() == R && rstd.numel() == R,
              "layer_norm_affine_sums: mean and rstd must have R = ", R, " values, got ",
              mean.numel(), " and ", rstd.numel());
  TORCH_CHECK(a.dim() == 1 && b.sizes() == a.sizes() && B > 0 && R % B == 0,
              "layer_norm_affine_sums: a and b must be (B,) with B dividing R = ", R, ", got ",
              a.sizes(), " and ", b.sizes());
  const auto gc = g.contiguous(), xc = x.contiguous(), mc = mean.contiguous(),
             rc = rstd.contiguous(), ac = a.contiguous(), bc = b.contiguous();
  auto gamma = at::empty({D}, x.options()), beta = at::empty({D}, x.options());
  const int64_t grain = std::max<int64_t>(16, (int64_t{1} << 16) / std::max<int64_t>(R, 1));
  AT_DISPATCH_FLOATING_TYPES(dtype, "layer_norm_affine_sums", [&] {
    const scalar_t *gp = gc.data_ptr<scalar_t>(), *xp = xc.data_ptr<scalar_t>();
    const scalar_t *mp = mc.data_ptr<scalar_t>(), *rp = rc.data_ptr<scalar_t>();
    const scalar_t *ap = ac.data_ptr<scalar_t>(), *bp = bc.data_ptr<scalar_t>();
    scalar_t *gam = gamma.data_ptr<scalar_t>(), *bet = beta.data_ptr<scalar_t>();
    at::parallel_for(0, D, grain, [&](int64_t lo, int64_t hi) {
      affine_sums(gp, xp, mp, rp, ap, bp, gam, bet, R, R / B, D, lo, hi);
    });
  });
  return {gamma, beta};
}

}  // namespace lowrank::capture
