// The CPU core of the per-sample-gradient Gram ops (gram_linear, gram_conv2d): a linear layer
// over T tokens, per group, from its token rows (defined in csrc/gram_linear.cpp):
//
//   K_ij = Σ_g Σ_{t,s} (a_itg·a2_jsg + b)(e_itg·e2_jsg),  b = 1 with a bias, else 0,
//
// the Gram (A2, E2 absent: symmetric, one triangle computed, then mirrored), the cross-Gram, or
// with diagonal=True the vector K_ii.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "lowrank/embedding_args.h"

namespace lowrank::gram {

using embedding::check_dim_match;
using embedding::check_float;
using embedding::check_ndim;
using embedding::check_same_device;
using embedding::py_dtype;
using embedding::py_shape;

enum class Route { kTokenPair, kPerSample };

// The cheaper exact route for these sizes (per group: d_in, d_out); see gram_linear.cpp.
Route choose_route(int64_t B1, int64_t B2, int64_t T, int64_t d_in, int64_t d_out,
                   int64_t groups, bool bias, bool cross, bool diagonal);

// K from token tensors A (B, T, groups·d_in), E (B, T, groups·d_out) (any strides, any
// floating dtype; float64 in gives float64 out, else float32) and the optional second batch.
at::Tensor gram_tokens(const at::Tensor& A, const at::Tensor& E, bool bias,
                       const std::optional<at::Tensor>& A2, const std::optional<at::Tensor>& E2,
                       bool diagonal, Route route, int64_t groups);

inline void check_same_dtype(const char* op, const char* a, const at::Tensor& ta, const char* b,
                             const at::Tensor& tb) {
  TORCH_CHECK_VALUE(ta.scalar_type() == tb.scalar_type(), op, ": ", a, " and ", b,
                    " must have the same dtype, got ", a, ": ", py_dtype(ta.scalar_type()),
                    ", ", b, ": ", py_dtype(tb.scalar_type()));
}

// The optional second batch (names: its two argument names) comes whole and agrees with the
// first in device, dtype and every dimension but the batch (and in that too with diagonal=True),
// as ops/_common.py check_cross.
inline void check_cross(const char* op, const char* n1, const char* n2, const at::Tensor& first1,
                        const at::Tensor& first2, const std::optional<at::Tensor>& s1,
                        const std::optional<at::Tensor>& s2, bool diagonal) {
  if (!s1.has_value() && !s2.has_value()) return;
  TORCH_CHECK_VALUE(s1.has_value() && s2.has_value(), op, ": ", n1, " and ", n2,
                    " must be given together (the second batch of the cross-Gram)");
  const at::Tensor* second[2] = {&*s1, &*s2};
  const at::Tensor* first[2] = {&first1, &first2};
  const char* names[2] = {n1, n2};
  for (int k = 0; k < 2; ++k) {
    const at::Tensor& t = *second[k];
    const at::Tensor& ref = *first[k];
    check_same_device(op, names[k], t, "the first batch", ref);
    check_same_dtype(op, names[k], t, "the first batch", ref);
    bool same = t.dim() == ref.dim();
    for (int64_t d = 1; same && d < t.dim(); ++d) same = t.size(d) == ref.size(d);
    TORCH_CHECK_VALUE(same, op, ": ", names[k], " must have the first batch's shape but for "
                      "dim 0, got ", py_shape(t.sizes()), " against ", py_shape(ref.sizes()));
  }
  TORCH_CHECK_VALUE(s1->size(0) == s2->size(0), op, ": ", n1, " and ", n2,
                    " must have the same batch size (dim 0), got ", s1->size(0), " and ",
                    s2->size(0));
  TORCH_CHECK_VALUE(!diagonal || s1->size(0) == first1.size(0), op, ": diagonal=True with ", n1,
                    "/", n2, " needs the first batch's size ", first1.size(0), ", got ",
                    s1->size(0));
}

}  // namespace lowrank::gram
