// lowrank_kernels::gram_conv2d's CPU kernel, registered on the public schema (declared in
// lowrank_kernels/ops/gram_conv2d.py): the per-sample-gradient Gram of a Conv2d
//
//   K_ij = Σ_groups Σ_{t,s} (ã_it·ã_js)(e_it·e_js),
//
// a linear layer over T = H_out·W_out tokens per group: the input tokens by im2col
// (lowrank/layer_common.h, U (B, C_in·kh·kw, T)), the output tokens E viewed (B, C_out, T), both
// read through transposed views, then the token core of gram_linear (lowrank/gram_tokens.h) on
// the route of its cost model (at the bench's 3×3 shapes: per sample, one bmm E_i U_iᵀ per group).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "lowrank/gram_tokens.h"
#include "lowrank/layer_checks.h"
#include "lowrank/layer_common.h"

namespace lowrank::gram {
namespace {

constexpr const char* kOp = "gram_conv2d";

// geometry: [kh, kw, stride_h, stride_w, padding_h, padding_w, dilation_h, dilation_w, groups]
at::Tensor gram_conv2d_cpu(const at::Tensor& X, const at::Tensor& E, at::IntArrayRef geometry,
                           bool bias, const std::optional<at::Tensor>& X2,
                           const std::optional<at::Tensor>& E2, bool diagonal) {
  const layer::Conv2dGeometry g = layer::check_conv2d(kOp, X, E, geometry);
  check_cross(kOp, "X2", "E2", X, E, X2, E2, diagonal);
  const int64_t groups = geometry[8];
  const at::ScalarType acc = X.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t T = g.H_out * g.W_out;
  // (B, T, C_in·kh·kw) and (B, T, C_out): transposed views of U and of E's (B, C_out, T)
  auto input_tokens = [&](const at::Tensor& Y) {
    return layer::im2col(Y.to(acc), g).transpose(1, 2);
  };
  auto output_tokens = [&](const at::Tensor& F) {
    return F.to(acc).reshape({F.size(0), F.size(1), T}).transpose(1, 2);
  };
  const bool cross = X2.has_value();
  const at::Tensor A = input_tokens(X), Et = output_tokens(E);
  const std::optional<at::Tensor> A2 = cross ? std::optional(input_tokens(*X2)) : std::nullopt;
  const std::optional<at::Tensor> Et2 = cross ? std::optional(output_tokens(*E2)) : std::nullopt;
  const Route route = choose_route(X.size(0), cross ? X2->size(0) : X.size(0), T,
                                   A.size(2) / groups, Et.size(2) / groups, groups, bias, cross,
                                   diagonal);
  return gram_tokens(A, Et, bias, A2, Et2, diagonal, route, groups);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_kernels, CPU, m) { m.impl("gram_conv2d", &gram_conv2d_cpu); }

}  // namespace lowrank::gram
