// The weighted affine gradients of a batch, group or layer norm call as a C++ post-hook on
// the call's own native backward node (lowrank_kernels/capture/_weighted_hooks.py), so that
// the weighted backward of a norm runs no Python: the node computes the plain input
// gradient (and its own affine gradients, which the hook replaces by)
//
//   weight: Σ_i w_i Σ_k g_ik x̂_ik,   bias: Σ_i wb_i Σ_k g_ik
//
// from the output gradient g, the call's input x and the statistics it normalized with
// (norm_affine_sums for channels, layer_norm_affine_sums for a layer norm's rows), read from
// the node's saved variables (torch's generated NativeBatchNorm/GroupNorm/LayerNormBackward0).
// The hook holds x, the statistics (detached: not the node's outputs, which would hold the
// node: a cycle) and the weights. lowrank_kernels._C.capture_hook_norm_affine
// (csrc/capture_py.cpp), CPU float32/float64.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/generated/Functions.h>
#include <torch/csrc/autograd/variable.h>

#include <memory>
#include <optional>
#include <tuple>
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

// A node as the autograd graph holds it (std::shared_ptr or c10::intrusive_ptr by torch
// version), as SavedVariable::unpack takes it for a node's own outputs.
using NodePtr = decltype(torch::autograd::Edge::function);

// The statistics that node (a native batch, group or layer norm backward) normalized x with,
// detached, and whether they are a layer norm's rows; nothing when node is none of these, is
// not on x, or its statistics are missing.
std::optional<std::tuple<at::Tensor, at::Tensor, bool>> norm_statistics(const NodePtr& node,
                                                                        const at::Tensor& x) {
  using namespace torch::autograd::generated;
  at::Tensor input, mean, invstd;
  bool layer_norm = false;
  if (auto* bn = dynamic_cast<NativeBatchNormBackward0*>(node.get())) {
    input = bn->input_.unpack();
    if (bn->training) {
      mean = bn->result1_.unpack(node);
      invstd = bn->result2_.unpack(node);
    } else {
      mean = bn->running_mean_.unpack();
      const at::Tensor var = bn->running_var_.unpack();
      if (var.defined()) invstd = (var + bn->eps).rsqrt();
    }
    if (mean.defined() && invstd.defined()) {
      mean = mean.view({1, -1});
      invstd = invstd.view({1, -1});
    }
  } else if (auto* gn = dynamic_cast<NativeGroupNormBackward0*>(node.get())) {
    input = gn->input_.unpack();
    mean = gn->result1_.unpack(node);
    invstd = gn->result2_.unpack(node);
  } else if (auto* ln = dynamic_cast<NativeLayerNormBackward0*>(node.get())) {
    input = ln->input_.unpack();
    mean = ln->result1_.unpack(node);
    invstd = ln->result2_.unpack(node);
    layer_norm = true;
  } else {
    return std::nullopt;
  }
  if (!input.defined() || input.unsafeGetTensorImpl() != x.unsafeGetTensorImpl() ||
      !mean.defined() || !invstd.defined())
    return std::nullopt;
  return std::make_tuple(mean.detach(), invstd.detach(), layer_norm);
}

}  // namespace

namespace lowrank::capture {

bool hook_norm_affine(const at::Tensor& y, const at::Tensor& x, const at::Tensor& w,
                      const at::Tensor& wb, int64_t weight_slot, int64_t bias_slot) {
  const auto dtype = x.scalar_type();
  if (y.grad_fn() == nullptr || !x.device().is_cpu() ||
      (dtype != at::kFloat && dtype != at::kDouble))
    return false;
  const NodePtr node = torch::autograd::impl::gradient_edge(y).function;  // y's grad_fn
  const auto statistics = norm_statistics(node, x);
  if (!statistics) return false;
  const auto& [mean, invstd, layer_norm] = *statistics;
  if (mean.scalar_type() != dtype || invstd.scalar_type() != dtype) return false;
  auto hook = std::make_unique<NormAffineHook>();
  hook->x = x.detach();
  hook->mean = mean;
  hook->invstd = invstd;
  hook->w = w.to(dtype);
  hook->wb = wb.to(dtype);
  hook->layer_norm = layer_norm;
  hook->weight_slot = weight_slot;
  hook->bias_slot = bias_slot;
  node->add_post_hook(std::move(hook));
  return true;
}

}  // namespace lowrank::capture
