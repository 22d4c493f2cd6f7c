// lowrank_kernels::weighted_sum_linear's CPU kernel, registered on the public schema (declared
// in lowrank_kernels/ops/weighted_sum_linear.py): U c = Σ_i c_i g_i = (c ⊙ E)ᵀ A over all
// (i, t) rows, for m coefficient columns at once, by the cheaper exact route of
// lowrank/per_sample_combine.h (one scaled GEMM, or per-sample gradients by bmm then Cᵀ G);
// with bias also Σ_{i,t} c_i e_it. Also lowrank_kernels_testing::weighted_sum_tokens: the same
// on grouped tokens with the route forced (for the tests of both routes).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "lowrank/layer_checks.h"
#include "lowrank/per_sample_combine.h"

namespace lowrank {
namespace {

using WeightAndBias = std::tuple<at::Tensor, std::optional<at::Tensor>>;

// A, E: (B[, T], G·width) layer tensors, c (B[, m]); the checks done.
WeightAndBias weighted_sum(const at::Tensor& A, const at::Tensor& E, const at::Tensor& c,
                           bool bias, int64_t groups, combine::Route route) {
  const auto dtype = combine::acc_dtype(A.scalar_type());
  const at::Tensor At = A.dim() == 3 ? A.to(dtype) : A.to(dtype).unsqueeze(1);
  const at::Tensor Et = E.dim() == 3 ? E.to(dtype) : E.to(dtype).unsqueeze(1);
  const at::Tensor C = (c.dim() == 2 ? c : c.unsqueeze(1)).to(dtype);
  auto [W, b] = combine::weighted_sum_tokens(At, Et, C, bias, groups, route);
  if (c.dim() == 2) return {W, b};
  return {W.squeeze(0), b.has_value() ? std::optional<at::Tensor>(b->squeeze(0)) : b};
}

WeightAndBias weighted_sum_linear_cpu(const at::Tensor& A, const at::Tensor& E,
                                      const at::Tensor& c, bool bias) {
  constexpr const char* op = "weighted_sum_linear";
  layer::check_linear_layer(op, A, E);
  layer::check_coefficients(op, c, E);
  return weighted_sum(A, E, c, bias, 1, combine::Route::kAuto);
}

WeightAndBias weighted_sum_tokens(const at::Tensor& A, const at::Tensor& E, const at::Tensor& c,
                                  bool bias, int64_t groups, c10::string_view route) {
  constexpr const char* op = "weighted_sum_tokens";
  layer::check_linear_layer(op, A, E);
  layer::check_coefficients(op, c, E);
  TORCH_CHECK_VALUE(groups >= 1 && A.size(-1) % groups == 0 && E.size(-1) % groups == 0, op,
                    ": groups must divide d_in and d_out, got ", groups);
  return weighted_sum(A, E, c, bias, groups, combine::parse_route(op, route));
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_kernels, CPU, m) {
  m.impl("weighted_sum_linear", &weighted_sum_linear_cpu);
}

TORCH_LIBRARY_FRAGMENT(lowrank_kernels_testing, m) {
  m.def("weighted_sum_tokens(Tensor A, Tensor E, Tensor c, bool bias, int groups, str route)"
        " -> (Tensor, Tensor?)");
}

TORCH_LIBRARY_IMPL(lowrank_kernels_testing, CPU, m) {
  m.impl("weighted_sum_tokens", &weighted_sum_tokens);
}

}  // namespace lowrank
