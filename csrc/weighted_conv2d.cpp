// A Conv2d call of Capture.weighted (lowrank_kernels/capture/_weighted_hooks.py) as one C++
// autograd node, so that neither its forward nor its backward runs Python: for x (B, C_in,
// H, W), the layer's weight W and bias b, and per-sample weights w, wb (B,),
//
//   y  = conv2d(x, W, b)                                    the layer's own forward;
//   gx = convolution_backward's input gradient of g,        the plain input gradient;
//   gW = convolution_backward's weight gradient of (g, x ⊙ w),   Σ_i w_i ∂W_i;
//   gb = Σ_i wb_i Σ_hw g_i,                                  Σ_i wb_i ∂b_i.
//
// The weight gradient is linear in each sample's input and the input gradient does not read
// x (only its shape), so one convolution_backward on x's rows scaled gives both — the one
// call the plain backward makes. lowrank_kernels._C.capture_weighted_conv2d
// (csrc/capture_py.cpp), private to the capture (any device: ATen calls).
#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <vector>

#include "lowrank/capture_nodes.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class WeightedConv2d : public torch::autograd::Function<WeightedConv2d> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& W,
                            const std::optional<at::Tensor>& b, const at::Tensor& w,
                            const at::Tensor& wb, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["has_bias"] = b.has_value();
    ctx->save_for_backward({x, W, w, wb});
    return at::convolution(x, W, b, stride, padding, dilation, false, {0, 0}, groups);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &W = saved[1], &w = saved[2], &wb = saved[3];
    const at::Tensor& g = grads[0];
    const int64_t B = x.size(0);
    const bool need_x = ctx->needs_input_grad(0), need_W = ctx->needs_input_grad(1);
    at::Tensor gx, gW, gb;
    if (need_x || need_W) {
      const at::Tensor input =
          need_W ? x * w.to(x.scalar_type()).view({B, 1, 1, 1}) : x;
      std::tie(gx, gW, std::ignore) = at::convolution_backward(
          g, input, W, std::nullopt, ctx->saved_data["stride"].toIntVector(),
          ctx->saved_data["padding"].toIntVector(), ctx->saved_data["dilation"].toIntVector(),
          false, {0, 0}, ctx->saved_data["groups"].toInt(), {need_x, need_W, false});
    }
    if (ctx->needs_input_grad(2) && ctx->saved_data["has_bias"].toBool())
      gb = at::mv(g.sum({2, 3}).t(), wb.to(g.scalar_type()));
    return {gx, gW, gb, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

}  // namespace

namespace lowrank::capture {

at::Tensor weighted_conv2d(const at::Tensor& x, const at::Tensor& W,
                           const std::optional<at::Tensor>& b, const at::Tensor& w,
                           const at::Tensor& wb, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4 && W.dim() == 4,
              "weighted_conv2d: x must be (B, C_in, H, W) and W (C_out, C_in/groups, kh, kw), "
              "got ", x.sizes(), " and ", W.sizes());
  TORCH_CHECK(w.dim() == 1 && wb.sizes() == w.sizes() && x.size(0) == w.size(0),
              "weighted_conv2d: w and wb must be (B,) with B = x.size(0) = ", x.size(0),
              ", got ", w.sizes(), " and ", wb.sizes());
  return WeightedConv2d::apply(x, W, b, w, wb, stride, padding, dilation, groups);
}

}  // namespace lowrank::capture
