// lowrank_kernels::project_conv2d's CPU kernel, registered on the public schema (declared in
// lowrank_kernels/ops/project_conv2d.py): (Uᵀ V)_i = ⟨g_i, V⟩ for a Conv2d — per group,
// Σ_t e_itᵀ V_g ã_it over the im2col tokens ã_it of X (+ Σ_t e_it·v_b) — by the cheaper exact
// route of lowrank/per_sample_combine.h, X unfolded by lowrank/layer_common.h's im2col. Also
// lowrank_kernels_testing::project_conv2d_route: the route forced.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "lowrank/layer_checks.h"
#include "lowrank/per_sample_combine.h"

namespace lowrank {
namespace {

// geometry: [stride_h, stride_w, padding_h, padding_w, dilation_h, dilation_w, groups] (the
// kernel size is V's)
at::Tensor project_conv2d(const at::Tensor& X, const at::Tensor& E, const at::Tensor& V,
                          const std::optional<at::Tensor>& V_bias, at::IntArrayRef geometry,
                          combine::Route route) {
  const layer::Conv2dGeometry g = layer::check_project_conv2d(X, E, V, V_bias, geometry);
  const int64_t groups = geometry[6];
  const int64_t C_in = X.size(1), C_out = E.size(1), B = X.size(0);
  const int64_t kernel[2] = {g.kh, g.kw};
  const int64_t shape[4] = {C_out, C_in / groups, kernel[0], kernel[1]};
  const auto dtype = combine::acc_dtype(X.scalar_type());
  const bool stacked = V.dim() == 5;
  const int64_t m = stacked ? V.size(0) : 1, k = shape[1] * kernel[0] * kernel[1];
  if (route == combine::Route::kAuto)
    route = combine::choose_route(B, g.H_out * g.W_out, k, C_out / groups, m);
  const at::Tensor A = layer::im2col(X.to(dtype), g).transpose(1, 2);  // (B, T, G k)
  const at::Tensor Vm = V.to(dtype).reshape({m, C_out, k});
  std::optional<at::Tensor> vb;
  if (V_bias.has_value()) vb = V_bias->to(dtype).reshape({m, C_out});
  const at::Tensor Et = E.to(dtype).flatten(2).transpose(1, 2);  // (B, T, C_out)
  at::Tensor out = combine::project_tokens(A, Et, Vm, vb, groups, route);
  return stacked ? out : out.squeeze(1);
}

at::Tensor project_conv2d_cpu(const at::Tensor& X, const at::Tensor& E, const at::Tensor& V,
                              const std::optional<at::Tensor>& V_bias,
                              at::IntArrayRef geometry) {
  return project_conv2d(X, E, V, V_bias, geometry, combine::Route::kAuto);
}

at::Tensor project_conv2d_route(const at::Tensor& X, const at::Tensor& E, const at::Tensor& V,
                                const std::optional<at::Tensor>& V_bias, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups, c10::string_view route) {
  std::vector<int64_t> geometry;
  for (at::IntArrayRef pair : {stride, padding, dilation})
    geometry.insert(geometry.end(), pair.begin(), pair.end());
  geometry.push_back(groups);
  return project_conv2d(X, E, V, V_bias, geometry,
                        combine::parse_route("project_conv2d_route", route));
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_kernels, CPU, m) { m.impl("project_conv2d", &project_conv2d_cpu); }

TORCH_LIBRARY_FRAGMENT(lowrank_kernels_testing, m) {
  m.def("project_conv2d_route(Tensor X, Tensor E, Tensor V, Tensor? V_bias, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups, str route) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowrank_kernels_testing, CPU, m) {
  m.impl("project_conv2d_route", &project_conv2d_route);
}

}  // namespace lowrank
