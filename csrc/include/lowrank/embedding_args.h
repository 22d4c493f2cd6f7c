// The argument checks of the embedding ops' CPU kernels (gram_embedding, weighted_sum_embedding,
// project_embedding): the same error types and messages as lowrank_kernels/ops/_common.py
// (TypeError / ValueError naming the op and the argument; an index out of range a RuntimeError
// with the text of the device assert), and the helpers they share.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "lowrank/hd.h"
#include "lowrank/py_checks.h"

namespace lowrank::embedding {

using checks::check_dim_match;
using checks::check_float;
using checks::check_ndim;
using checks::check_same_device;
using checks::py_dtype;
using checks::py_shape;

// idx (B, T) int64 and E (B, T, d) floating, on one device.
inline void check_idx_E(const char* op, const char* idx_name, const at::Tensor& idx,
                        const char* E_name, const at::Tensor& E) {
  check_ndim(op, idx_name, idx, 2, 2, "B x T: token indices");
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, op, ": ", idx_name,
                   " must be an int64 tensor of indices, got ", py_dtype(idx.scalar_type()));
  check_ndim(op, E_name, E, 3, 3, "B x T x d: gradients of the embedding outputs");
  check_float(op, E_name, E);
  check_same_device(op, idx_name, idx, E_name, E);
  TORCH_CHECK_VALUE(E.size(0) == idx.size(0) && E.size(1) == idx.size(1), op, ": ", idx_name,
                    " and ", E_name, " must have the same (B, T) leading dims, got ",
                    py_shape(idx.sizes()), " and ", py_shape(E.sizes()));
}

// padding_idx in [-N, N), returned as nn.Embedding stores it (from 0; -1: no padding).
inline int64_t checked_padding(const char* op, int64_t num_embeddings,
                               std::optional<int64_t> padding_idx) {
  TORCH_CHECK_VALUE(num_embeddings >= 1, op, ": num_embeddings must be positive, got ",
                    num_embeddings);
  if (!padding_idx.has_value()) return -1;
  const int64_t p = *padding_idx;
  TORCH_CHECK_VALUE(p >= -num_embeddings && p < num_embeddings, op,
                    ": padding_idx must be in [-num_embeddings, num_embeddings) = [",
                    -num_embeddings, ", ", num_embeddings, "), got ", p);
  return p < 0 ? p + num_embeddings : p;
}

// Every index in [0, N): read on the host (a CPU tensor), with the device assert's message.
inline void check_index_range(const char* op, const char* name, const int64_t* p, index_t n,
                              int64_t num_embeddings) {
  bool ok = true;
  for (index_t k = 0; k < n; ++k)
    ok &= static_cast<std::uint64_t>(p[k]) < static_cast<std::uint64_t>(num_embeddings);
  TORCH_CHECK(ok, op, ": ", name, " must hold indices in [0, ", num_embeddings, ")");
}

// The accumulation dtype: float64 for float64 E, float32 for everything else.
inline at::ScalarType acc_type(const at::Tensor& E) {
  return E.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Σ_k a_k b_k with Parts partial sums (so that the compiler vectorizes it without
// reassociating; 32 = 4 AVX2 vectors hide the adds' latency). Always inlined: a caller
// compiled for several targets (target_clones) gets it compiled for each.
template <int Parts = 8, typename S>
inline __attribute__((always_inline)) S dot(const S* a, const S* b, index_t n) {
  S part[Parts] = {};
  index_t k = 0;
  for (; k + Parts <= n; k += Parts)
    for (int j = 0; j < Parts; ++j) part[j] += a[k + j] * b[k + j];
  S s = 0;
  for (; k < n; ++k) s += a[k] * b[k];
  for (int j = 0; j < Parts; ++j) s += part[j];
  return s;
}

}  // namespace lowrank::embedding
