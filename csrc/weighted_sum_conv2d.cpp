// lowrank_kernels::weighted_sum_conv2d's CPU kernel, registered on the public schema (declared
// in lowrank_kernels/ops/weighted_sum_conv2d.py): U c = Σ_i c_i g_i for a Conv2d — per group,
// (c ⊙ E)ᵀ im2col(X) over all (i, output pixel) rows — by the cheaper exact route of
// lowrank/per_sample_combine.h, X unfolded by lowrank/layer_common.h's im2col. Also
// lowrank_kernels_testing::weighted_sum_conv2d_route: the route forced.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "lowrank/layer_checks.h"
#include "lowrank/per_sample_combine.h"

namespace lowrank {
namespace {

using WeightAndBias = std::tuple<at::Tensor, std::optional<at::Tensor>>;

// geometry: [kh, kw, stride_h, stride_w, padding_h, padding_w, dilation_h, dilation_w, groups]
WeightAndBias weighted_sum_conv2d(const at::Tensor& X, const at::Tensor& E, const at::Tensor& c,
                                  at::IntArrayRef geometry, bool bias, combine::Route route) {
  constexpr const char* op = "weighted_sum_conv2d";
  const layer::Conv2dGeometry g = layer::check_conv2d(op, X, E, geometry);
  const int64_t groups = geometry[8];
  layer::check_coefficients(op, c, E);
  const auto dtype = combine::acc_dtype(X.scalar_type());
  const int64_t B = X.size(0), C_in = X.size(1), C_out = E.size(1);
  const int64_t k = C_in / groups * g.kh * g.kw;
  const int64_t m = c.dim() == 2 ? c.size(1) : 1;
  if (route == combine::Route::kAuto)
    route = combine::choose_route(B, g.H_out * g.W_out, k, C_out / groups, m);
  const at::Tensor A = layer::im2col(X.to(dtype), g).transpose(1, 2);  // (B, T, G k)
  const at::Tensor C = (c.dim() == 2 ? c : c.unsqueeze(1)).to(dtype);
  const at::Tensor Et = E.to(dtype).flatten(2).transpose(1, 2);  // (B, T, C_out)
  auto [W, b] = combine::weighted_sum_tokens(A, Et, C, bias, groups, route);
  W = W.view({m, C_out, C_in / groups, g.kh, g.kw});
  if (c.dim() == 2) return {W, b};
  return {W.squeeze(0), b.has_value() ? std::optional<at::Tensor>(b->squeeze(0)) : b};
}

WeightAndBias weighted_sum_conv2d_cpu(const at::Tensor& X, const at::Tensor& E,
                                      const at::Tensor& c, at::IntArrayRef geometry, bool bias) {
  return weighted_sum_conv2d(X, E, c, geometry, bias, combine::Route::kAuto);
}

WeightAndBias weighted_sum_conv2d_route(const at::Tensor& X, const at::Tensor& E,
                                        const at::Tensor& c, at::IntArrayRef kernel_size,
                                        at::IntArrayRef stride, at::IntArrayRef padding,
                                        at::IntArrayRef dilation, int64_t groups, bool bias,
                                        c10::string_view route) {
  std::vector<int64_t> geometry(kernel_size.begin(), kernel_size.end());
  for (at::IntArrayRef pair : {stride, padding, dilation})
    geometry.insert(geometry.end(), pair.begin(), pair.end());
  geometry.push_back(groups);
  return weighted_sum_conv2d(X, E, c, geometry, bias,
                             combine::parse_route("weighted_sum_conv2d_route", route));
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_kernels, CPU, m) {
  m.impl("weighted_sum_conv2d", &weighted_sum_conv2d_cpu);
}

TORCH_LIBRARY_FRAGMENT(lowrank_kernels_testing, m) {
  m.def("weighted_sum_conv2d_route(Tensor X, Tensor E, Tensor c, int[2] kernel_size, "
        "int[2] stride, int[2] padding, int[2] dilation, int groups, bool bias, str route)"
        " -> (Tensor, Tensor?)");
}

TORCH_LIBRARY_IMPL(lowrank_kernels_testing, CPU, m) {
  m.impl("weighted_sum_conv2d_route", &weighted_sum_conv2d_route);
}

}  // namespace lowrank
