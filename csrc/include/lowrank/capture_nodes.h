// The capture's C++ pieces of the weighted backward (lowrank_kernels/capture/_weighted*.py),
// called from Python through lowrank_kernels._C (csrc/capture_py.cpp) rather than the
// dispatcher: they run in eager layer calls and backward hooks only, where a torch.ops call
// would cost 10–25 µs of argument boxing per call.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace lowrank::capture {

// y of a Linear (transposed: transformers Conv1D) call as one autograd node whose backward
// gives the plain input gradient, Σ_i w_i ∂W_i and Σ_i wb_i ∂b_i (csrc/weighted_linear.cpp).
at::Tensor weighted_linear(const at::Tensor& x, const at::Tensor& W,
                           const std::optional<at::Tensor>& b, const at::Tensor& w,
                           const at::Tensor& wb, bool transposed);

// The same for a zero-padded Conv2d call (csrc/weighted_conv2d.cpp).
at::Tensor weighted_conv2d(const at::Tensor& x, const at::Tensor& W,
                           const std::optional<at::Tensor>& b, const at::Tensor& w,
                           const at::Tensor& wb, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups);

// (Σ_n w_n Σ_k g x̂, Σ_n wb_n Σ_k g) per channel of a batch / group norm (CPU;
// csrc/norm_affine_sums.cpp).
std::tuple<at::Tensor, at::Tensor> norm_affine_sums(const at::Tensor& g, const at::Tensor& x,
                                                    const at::Tensor& mean,
                                                    const at::Tensor& invstd,
                                                    const at::Tensor& w, const at::Tensor& wb);

// (Σ_r a_r/T g_r ⊙ x̂_r, Σ_r b_r/T g_r) of a layer norm's rows (CPU;
// csrc/layer_norm_affine_sums.cpp).
std::tuple<at::Tensor, at::Tensor> layer_norm_affine_sums(const at::Tensor& g,
                                                          const at::Tensor& x,
                                                          const at::Tensor& mean,
                                                          const at::Tensor& rstd,
                                                          const at::Tensor& a,
                                                          const at::Tensor& b);

// Puts the weighted affine gradients of a norm call on y's node as a C++ post-hook that
// replaces its output slots weight_slot / bias_slot (-1: none) by the sums above, when the
// node is a native batch / group / layer norm's on x (CPU, float32/64); whether it did
// (csrc/norm_affine_hook.cpp).
bool hook_norm_affine(const at::Tensor& y, const at::Tensor& x, const at::Tensor& w,
                      const at::Tensor& wb, int64_t weight_slot, int64_t bias_slot);

}  // namespace lowrank::capture
