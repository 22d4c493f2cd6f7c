// A Linear (y = x Wᵀ + b) or transformers Conv1D (y = x W + b) call of Capture.weighted
// (lowrank_kernels/capture/_weighted_hooks.py) as one C++ autograd node, so that its backward
// runs no Python: for x (B·T rows, sample-major: row r of sample r / T, any leading dims) and
// per-sample weights w, wb (B,),
//
//   gx = g W (Linear) or g Wᵀ (Conv1D),                   the plain input gradient;
//   gW = gᵀ (x ⊙ w_rows) (Linear) or (x ⊙ w_rows)ᵀ g,      Σ_i w_i ∂W_i;
//   gb = Σ_i wb_i Σ_t g_it,                                Σ_i wb_i ∂b_i.
//
// The forward is the layer's own: at::linear (Linear), at::addmm on the rows (Conv1D, as
// transformers computes it). lowrank_kernels._C.capture_weighted_linear (csrc/capture_py.cpp),
// private to the capture (any device: ATen calls).
#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <vector>

#include "lowrank/capture_nodes.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor rows_scaled(const at::Tensor& x2, const at::Tensor& w) {
  const int64_t B = w.size(0);
  return (x2.reshape({B, -1}) * w.to(x2.scalar_type()).unsqueeze(1)).view(x2.sizes());
}

class WeightedLinear : public torch::autograd::Function<WeightedLinear> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& W,
                            const std::optional<at::Tensor>& b, const at::Tensor& w,
                            const at::Tensor& wb, bool transposed) {
    ctx->saved_data["transposed"] = transposed;
    ctx->saved_data["has_bias"] = b.has_value();
    ctx->save_for_backward({x, W, w, wb});
    if (!transposed) return at::linear(x, W, b);
    auto sizes = x.sizes().vec();
    sizes.back() = W.size(1);
    const at::Tensor x2 = x.reshape({-1, x.size(-1)});
    return (b.has_value() ? at::addmm(*b, x2, W) : at::mm(x2, W)).view(sizes);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &W = saved[1], &w = saved[2], &wb = saved[3];
    const bool transposed = ctx->saved_data["transposed"].toBool();
    const at::Tensor g2 = grads[0].reshape({-1, grads[0].size(-1)});
    at::Tensor gx, gW, gb;
    if (ctx->needs_input_grad(0))
      gx = (transposed ? g2.mm(W.t()) : g2.mm(W)).view(x.sizes());
    if (ctx->needs_input_grad(1)) {
      const at::Tensor xw = rows_scaled(x.reshape({-1, x.size(-1)}), w);
      gW = transposed ? xw.t().mm(g2) : g2.t().mm(xw);
    }
    if (ctx->needs_input_grad(2) && ctx->saved_data["has_bias"].toBool()) {
      const int64_t B = wb.size(0);
      gb = wb.to(g2.scalar_type()).unsqueeze(0).mm(g2.reshape({B, -1, g2.size(1)}).sum(1))
               .squeeze(0);
    }
    return {gx, gW, gb, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

namespace lowrank::capture {

at::Tensor weighted_linear(const at::Tensor& x, const at::Tensor& W,
                           const std::optional<at::Tensor>& b, const at::Tensor& w,
                           const at::Tensor& wb, bool transposed) {
  TORCH_CHECK(W.dim() == 2, "weighted_linear: W must be 2-D, got ", W.sizes());
  const int64_t d_in = transposed ? W.size(0) : W.size(1);
  TORCH_CHECK(x.dim() >= 2 && x.size(-1) == d_in,
              "weighted_linear: x must be (B, ..., ", d_in, ") for W of shape ", W.sizes(),
              ", got ", x.sizes());
  TORCH_CHECK(w.dim() == 1 && wb.sizes() == w.sizes() && w.size(0) > 0 &&
                  x.size(0) == w.size(0),
              "weighted_linear: w and wb must be (B,) with B = x.size(0) = ", x.size(0),
              ", got ", w.sizes(), " and ", wb.sizes());
  return WeightedLinear::apply(x, W, b, w, wb, transposed);
}

}  // namespace lowrank::capture
