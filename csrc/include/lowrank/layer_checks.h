// The argument checks of the linear and Conv2d layer ops' C++ kernels: the same error types
// (TypeError / ValueError) and messages as lowrank_kernels/ops/_common.py (built on the
// _checks.py mirrors of lowrank/py_checks.h), naming the op and the argument.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <string>
#include <vector>

#include "lowrank/layer_common.h"
#include "lowrank/py_checks.h"

namespace lowrank::layer {

using checks::check_dim_match;
using checks::check_float;
using checks::check_ndim;
using checks::check_same_device;
using checks::py_dtype;
using checks::py_shape;

// A list of ints as Python prints it: [3, 3].
inline std::string py_list(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

inline void check_same_dtype(const char* op, const char* a, const at::Tensor& ta,
                             const char* b, const at::Tensor& tb) {
  TORCH_CHECK_VALUE(ta.scalar_type() == tb.scalar_type(), op, ": ", a, " and ", b,
                    " must have the same dtype, got ", a, ": ", py_dtype(ta.scalar_type()), ", ",
                    b, ": ", py_dtype(tb.scalar_type()));
}

// ops/_common.check_linear_layer: A (B[, T], d_in) and E (B[, T], d_out): same dtype, device,
// B and T.
inline void check_linear_layer(const char* op, const at::Tensor& A, const at::Tensor& E) {
  check_ndim(op, "A", A, 2, 3, "B x d_in or B x T x d_in: layer inputs");
  check_ndim(op, "E", E, 2, 3, "B x d_out or B x T x d_out: gradients of the layer outputs");
  check_float(op, "A", A);
  check_float(op, "E", E);
  check_same_device(op, "A", A, "E", E);
  check_same_dtype(op, "A", A, "E", E);
  check_dim_match(op, "A", A.size(0), "E", E.size(0), "batch size B (dim 0)");
  check_dim_match(op, "A", A.dim(), "E", E.dim(), "number of dims");
  if (A.dim() == 3)
    check_dim_match(op, "A", A.size(1), "E", E.size(1), "token count T (dim 1)");
}

// ops/_common.check_coefficients: c (B,) or (B, m), floating, on E's device.
inline void check_coefficients(const char* op, const at::Tensor& c, const at::Tensor& E) {
  check_ndim(op, "c", c, 1, 2, "B or B x m: the coefficients, one row a sample");
  check_float(op, "c", c);
  check_same_device(op, "c", c, "the layer tensors", E);
  check_dim_match(op, "c", c.size(0), "E", E.size(0), "batch size B (dim 0)");
}

// ops/_common.check_directions: V (shape) or (m, *shape), V_bias (shape[0],) or (m, shape[0]).
inline void check_directions(const char* op, const at::Tensor& V,
                             const std::optional<at::Tensor>& V_bias, at::IntArrayRef shape,
                             const at::Tensor& lead, const std::string& doc) {
  const auto n = static_cast<int64_t>(shape.size());
  check_ndim(op, "V", V, n, n + 1, doc.c_str());
  check_float(op, "V", V);
  check_same_device(op, "V", V, "the layer tensors", lead);
  TORCH_CHECK_VALUE(V.sizes().slice(V.dim() - n) == shape, op, ": V must have the weight's shape ",
                    py_shape(shape), " in its last ", n, " dims, got ", py_shape(V.sizes()));
  if (!V_bias.has_value()) return;
  const at::Tensor& vb = *V_bias;
  check_ndim(op, "V_bias", vb, V.dim() - n + 1, V.dim() - n + 1,
             "the bias part of each direction");
  check_float(op, "V_bias", vb);
  check_same_device(op, "V_bias", vb, "V", V);
  std::vector<int64_t> expected(V.sizes().begin(), V.sizes().end() - n);
  expected.push_back(shape[0]);
  TORCH_CHECK_VALUE(vb.sizes() == at::IntArrayRef(expected), op, ": V_bias must have shape ",
                    py_shape(expected), " (one bias vector per direction of V), got ",
                    py_shape(vb.sizes()));
}

inline std::array<int64_t, 2> conv_pair(const char* op, const char* name, at::IntArrayRef v,
                                        int64_t minimum) {
  TORCH_CHECK_VALUE(v.size() == 2 && v[0] >= minimum && v[1] >= minimum, op, ": ", name,
                    " must be an int or a pair of ints \u2265 ", minimum, ", got ", py_list(v));
  return {v[0], v[1]};
}

inline void check_conv2d_tensors(const char* op, const at::Tensor& X, const at::Tensor& E) {
  check_ndim(op, "X", X, 4, 4, "B x C_in x H x W: the layer input");
  check_ndim(op, "E", E, 4, 4, "B x C_out x H_out x W_out: the output gradient");
  check_float(op, "X", X);
  check_float(op, "E", E);
  check_same_device(op, "X", X, "E", E);
  check_same_dtype(op, "X", X, "E", E);
  check_dim_match(op, "X", X.size(0), "E", E.size(0), "batch size B (dim 0)");
}

inline Conv2dGeometry check_conv2d(const char* op, const at::Tensor& X, const at::Tensor& E,
                                   at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups) {
  check_conv2d_tensors(op, X, E);
  const auto k = conv_pair(op, "kernel_size", kernel_size, 1);
  const auto st = conv_pair(op, "stride", stride, 1);
  const auto p = conv_pair(op, "padding", padding, 0);
  const auto dl = conv_pair(op, "dilation", dilation, 1);
  TORCH_CHECK_VALUE(groups >= 1 && X.size(1) % groups == 0 && E.size(1) % groups == 0, op,
                    ": groups must be a positive int dividing C_in (", X.size(1),
                    ") and C_out (", E.size(1), "), got ", groups);
  int64_t out[2];
  for (int d = 0; d < 2; ++d) {  // Python's floor division
    const int64_t span = X.size(2 + d) + 2 * p[d] - dl[d] * (k[d] - 1) - 1;
    out[d] = (span >= 0 ? span / st[d] : -((-span + st[d] - 1) / st[d])) + 1;
  }
  TORCH_CHECK_VALUE(E.size(2) == out[0] && E.size(3) == out[1] && out[0] >= 1 && out[1] >= 1,
                    op, ": E must be the gradient of the conv output, of spatial size (", out[0],
                    ", ", out[1], ") for X ", py_shape(X.sizes().slice(2)), " with kernel_size ",
                    py_list(k), ", stride ", py_list(st), ", padding ", py_list(p),
                    ", dilation ", py_list(dl), "; got ", py_shape(E.sizes().slice(2)));
  return Conv2dGeometry{k[0], k[1], st[0], st[1], p[0], p[1], dl[0], dl[1], out[0], out[1]};
}

// The public ops' `int[] geometry` (ops/_common.py conv_geometry): [kh, kw,] stride_h,
// stride_w, padding_h, padding_w, dilation_h, dilation_w, groups — without the kernel size
// (project_conv2d) when `kernel` is given, (kh, kw) of V. The same error as check_geometry
// there for a list of the wrong length, then the checks above.
inline Conv2dGeometry check_conv2d(const char* op, const at::Tensor& X, const at::Tensor& E,
                                   at::IntArrayRef geometry,
                                   std::optional<at::IntArrayRef> kernel = std::nullopt) {
  const bool with_kernel = !kernel.has_value();
  const size_t n = with_kernel ? 9 : 7;
  if (geometry.size() != n) check_conv2d_tensors(op, X, E);  // their errors first, as in Python
  TORCH_CHECK_VALUE(geometry.size() == n, op, ": geometry must be ", n, " ints [",
                    with_kernel ? "kernel_size[0], kernel_size[1], " : "",
                    "stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], "
                    "groups], got ", py_list(geometry));
  const at::IntArrayRef rest = with_kernel ? geometry.slice(2) : geometry;
  return check_conv2d(op, X, E, with_kernel ? geometry.slice(0, 2) : *kernel, rest.slice(0, 2),
                      rest.slice(2, 2), rest.slice(4, 2), rest[6]);
}

// project_conv2d's checks (ops/project_conv2d.py check): V ([m,] C_out, C_in/groups, kh, kw)
// gives the kernel size; geometry without it.
inline Conv2dGeometry check_project_conv2d(const at::Tensor& X, const at::Tensor& E,
                                           const at::Tensor& V,
                                           const std::optional<at::Tensor>& V_bias,
                                           at::IntArrayRef geometry) {
  constexpr const char* op = "project_conv2d";
  constexpr const char* doc =
      "C_out x C_in/groups x kh x kw or m x that: weight-shaped directions";
  check_ndim(op, "V", V, 4, 5, doc);
  const int64_t kernel[2] = {V.size(-2), V.size(-1)};
  const Conv2dGeometry g = check_conv2d(op, X, E, geometry, kernel);
  const int64_t shape[4] = {E.size(1), X.size(1) / geometry[6], kernel[0], kernel[1]};
  check_directions(op, V, V_bias, shape, E, doc);
  return g;
}

}  // namespace lowrank::layer
