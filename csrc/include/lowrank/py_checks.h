// Argument checks of the C++ CPU kernels that raise what the Python checks
// (lowrank_kernels/_checks.py) raise: the same error type (TORCH_CHECK_TYPE: TypeError,
// TORCH_CHECK_VALUE: ValueError) and message, naming the op and the argument, shapes and
// dtypes spelled as Python prints them.
#pragma once
#include <ATen/ATen.h>

#include <string>

namespace lowrank::checks {

// A shape as Python prints a tuple: (3, 4), (3,), ().
inline std::string py_shape(at::IntArrayRef s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

// A dtype as Python prints it (torch.float32).
inline std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline std::string py_device(const at::Tensor& t) { return t.device().str(); }

inline void check_ndim(const char* op, const char* name, const at::Tensor& t, int64_t lo,
                       int64_t hi, const char* doc) {
  const int64_t n = t.dim();
  if (n >= lo && n <= hi) return;
  const std::string want = lo == hi ? std::to_string(lo)
                                    : std::to_string(lo) + " or " + std::to_string(hi);
  TORCH_CHECK_VALUE(false, op, ": ", name, " must be a ", want, "-D tensor (", doc,
                    "), got shape ", py_shape(t.sizes()));
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble,
                   op, ": ", name, " must have a floating dtype (float32, float16, bfloat16, "
                   "float64), got ", py_dtype(s));
}

inline void check_same_device(const char* op, const char* a, const at::Tensor& ta,
                              const char* b, const at::Tensor& tb) {
  TORCH_CHECK_VALUE(ta.device() == tb.device(), op, ": ", a, " and ", b,
                    " must have the same device, got ", a, ": ", py_device(ta), ", ", b, ": ",
                    py_device(tb));
}

inline void check_dim_match(const char* op, const char* a, int64_t sa, const char* b,
                            int64_t sb, const char* what) {
  TORCH_CHECK_VALUE(sa == sb, op, ": ", a, " and ", b, " must have the same ", what, ", got ",
                    sa, " and ", sb);
}

}  // namespace lowrank::checks
