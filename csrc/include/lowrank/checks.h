// Argument checks shared by the native CPU and CUDA kernels: each error names the op, the
// argument and what was expected. (The Python layer runs the same checks first; these guard
// direct calls of torch.ops.lowrank_native.*.)
#pragma once
#include <torch/library.h>

#include <string>

namespace lowrank {

inline void check_rank(const at::Tensor& t, int64_t rank, const char* op, const char* name,
                       const char* shape) {
  TORCH_CHECK(t.dim() == rank, op, ": ", name, " must be a ", rank, "-D tensor (", shape,
              "), got a ", t.dim(), "-D tensor of shape ", t.sizes());
}

inline void check_same_rows(const at::Tensor& a, const at::Tensor& b, const char* op,
                            const char* name_a, const char* name_b) {
  TORCH_CHECK(a.size(0) == b.size(0), op, ": ", name_a, " and ", name_b,
              " must have the same batch size B (dim 0), got ", a.size(0), " and ", b.size(0));
}

inline void check_same_device_dtype(const at::Tensor& a, const at::Tensor& b, const char* op,
                                    const char* name_a, const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", name_a, " and ", name_b,
              " must be on the same device, got ", a.device(), " and ", b.device());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", name_a, " and ", name_b,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

inline void check_float_dtype(const at::Tensor& t, bool allow_bf16, const char* op,
                              const char* name) {
  const auto st = t.scalar_type();
  const bool ok = st == at::kFloat || st == at::kHalf || (allow_bf16 && st == at::kBFloat16);
  TORCH_CHECK(ok, op, ": ", name, " must be float32 or float16",
              allow_bf16 ? " or bfloat16" : "", " for the native backend, got ", st);
}

}  // namespace lowrank
