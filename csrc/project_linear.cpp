// lowrank_kernels::project_linear's CPU kernel, registered on the public schema (declared in
// lowrank_kernels/ops/project_linear.py): (Uᵀ V)_i = Σ_t e_itᵀ V a_it (+ Σ_t e_it·V_bias) for m
// directions at once, by the cheaper exact route of lowrank/per_sample_combine.h (one GEMM
// Y = A Vᵀ then row dots with E, or per-sample gradients by bmm then G Vᵀ). Also
// lowrank_kernels_testing::project_tokens: the same on grouped tokens with the route forced.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "lowrank/layer_checks.h"
#include "lowrank/per_sample_combine.h"

namespace lowrank {
namespace {

// A, E: (B[, T], G·width) layer tensors, V ([m,] G d_out, d_in); the checks done.
at::Tensor project(const at::Tensor& A, const at::Tensor& E, const at::Tensor& V,
                   const std::optional<at::Tensor>& V_bias, int64_t groups,
                   combine::Route route) {
  const auto dtype = combine::acc_dtype(A.scalar_type());
  const at::Tensor At = A.dim() == 3 ? A.to(dtype) : A.to(dtype).unsqueeze(1);
  const at::Tensor Et = E.dim() == 3 ? E.to(dtype) : E.to(dtype).unsqueeze(1);
  const bool stacked = V.dim() == 3;
  const at::Tensor Vm = (stacked ? V : V.unsqueeze(0)).to(dtype);
  std::optional<at::Tensor> vb;
  if (V_bias.has_value()) vb = (stacked ? *V_bias : V_bias->unsqueeze(0)).to(dtype);
  at::Tensor out = combine::project_tokens(At, Et, Vm, vb, groups, route);
  return stacked ? out : out.squeeze(1);
}

at::Tensor project_linear_cpu(const at::Tensor& A, const at::Tensor& E, const at::Tensor& V,
                              const std::optional<at::Tensor>& V_bias) {
  constexpr const char* op = "project_linear";
  layer::check_linear_layer(op, A, E);
  const int64_t shape[2] = {E.size(-1), A.size(-1)};
  layer::check_directions(op, V, V_bias, shape, E,
                          std::to_string(shape[0]) + " x " + std::to_string(shape[1]) +
                              " or m x that: weight-shaped directions");
  return project(A, E, V, V_bias, 1, combine::Route::kAuto);
}

at::Tensor project_tokens(const at::Tensor& A, const at::Tensor& E, const at::Tensor& V,
                          const std::optional<at::Tensor>& V_bias, int64_t groups,
                          c10::string_view route) {
  constexpr const char* op = "project_tokens";
  layer::check_linear_layer(op, A, E);
  TORCH_CHECK_VALUE(groups >= 1 && A.size(-1) % groups == 0 && E.size(-1) % groups == 0, op,
                    ": groups must divide d_in and d_out, got ", groups);
  const int64_t shape[2] = {E.size(-1), A.size(-1) / groups};
  layer::check_directions(op, V, V_bias, shape, E, "G d_out x d_in or m x that");
  return project(A, E, V, V_bias, groups, combine::parse_route(op, route));
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_kernels, CPU, m) { m.impl("project_linear", &project_linear_cpu); }

TORCH_LIBRARY_FRAGMENT(lowrank_kernels_testing, m) {
  m.def("project_tokens(Tensor A, Tensor E, Tensor V, Tensor? V_bias, int groups, str route)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(lowrank_kernels_testing, CPU, m) { m.impl("project_tokens", &project_tokens); }

}  // namespace lowrank
