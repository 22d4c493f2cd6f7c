// The weighted affine gradients of a batch, group or layer norm call as a C++ post-hook on
// the call's own native backward node (lowrank_kernels/capture/_weighted_hooks.py), so that
// the weighted backward of a norm runs no Python: the node computes the plain input
// gradient (and its own affine gradients, which the hook replaces by)
//
//   weight: Σ_i w_i Σ_k g_ik x̂_ik,   bias: Σ_i wb_i Σ_k g_ik
//
// from the output gradient g, the call's input x and the statistics it normalized with
// (norm_affine_sums for channels, layer_norm_affine_sums for a layer norm's rows). The hook
// holds x, the statistics (detached: not the node's outputs, which would hold the node) and
// the weights. lowrank_kernels._C.capture_hook_norm_affine (csrc/capture_py.cpp), CPU.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>

#include <memory>
#include <utility>

#include "lowrank/capture_nodes.h"

namespace {

using torch::autograd::variable_list;

struct NormAffineHook : torch::autograd::FunctionPostHook {
  at::Tensor x, mean, invstd, w, wb;
  bool layer_norm;
  int64_t weight_slot, bias_slot;  // the node's output slots of the parameters, or -1

  variable_list operator()(const variable_list& grad_inputs,
                           const variable_list& grad_outputs) override {
    variable_list out = grad_inputs;
    const at::Tensor& g_out = grad_outputs.at(0);
    if (!g_out.defined()) return out;
    const at::Tensor g = g_out.scalar_type() == x.scalar_type() ? g_out
                                                                : g_out.to(x.scalar_type());
    at::Tensor gw, gb;
    if (layer_norm) {
      const int64_t R = mean.numel();
      std::tie(gw, gb) = lowrank::capture::layer_norm_affine_sums(
          g.reshape({R, -1}), x.reshape({R, -1}), mean.reshape({R}), invstd.reshape({R}), w,
          wb);
    } else {
      std::tie(gw, gb) = lowrank::capture::norm_affine_sums(g, x, mean, invstd, w, wb);
    }
    for (const auto& [slot, sums] : {std::pair{weight_slot, gw}, std::pair{bias_slot, gb}}) {
      if (slot < 0 || slot >= static_cast<int64_t>(out.size()) || !out[slot].defined()) continue;
      out[slot] = sums.view(out[slot].sizes()).to(out[slot].scalar_type());
    }
    return out;
  }
};

}  // namespace

namespace lowrank::capture {

void hook_norm_affine(const at::Tensor& y, const at::Tensor& x, const at::Tensor& mean,
                      const at::Tensor& invstd, const at::Tensor& w, const at::Tensor& wb,
                      bool layer_norm, int64_t weight_slot, int64_t bias_slot) {
  const auto& node = y.grad_fn();
  TORCH_CHECK(node != nullptr, "hook_norm_affine: y has no grad_fn");
  TORCH_CHECK(x.device().is_cpu() && mean.scalar_type() == x.scalar_type() &&
                  invstd.scalar_type() == x.scalar_type(),
              "hook_norm_affine: x, mean and invstd must be CPU tensors of one dtype");
  auto hook = std::make_unique<NormAffineHook>();
  hook->x = x.detach();
  hook->mean = mean.detach();
  hook->invstd = invstd.detach();
  hook->w = w.to(x.scalar_type());
  hook->wb = wb.to(x.scalar_type());
  hook->layer_norm = layer_norm;
  hook->weight_slot = weight_slot;
  hook->bias_slot = bias_slot;
  node->add_post_hook(std::move(hook));
}

}  // namespace lowrank::capture
