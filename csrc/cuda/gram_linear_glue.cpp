// CUDA registration of lowrank_native::gram_linear: checks, output allocation, and the
// launch of the torch-free kernel in gram_linear.cu on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "gram_linear.cuh"
#include "lowrank/checks.h"

namespace lowrank {
namespace {

at::Tensor gram_linear_cuda(const at::Tensor& A, const at::Tensor& E, bool bias) {
  constexpr const char* op = "lowrank_native::gram_linear";
  check_rank(A, 2, op, "A", "B x d_in");
  check_rank(E, 2, op, "E", "B x d_out");
  check_same_rows(A, E, op, "A", "E");
  check_same_device_dtype(A, E, op, "A", "E");
  check_float_dtype(A, /*allow_bf16=*/true, op, "A");
  const c10::cuda::CUDAGuard guard(A.device());
  at::Tensor K = at::empty({A.size(0), A.size(0)}, A.options().dtype(at::kFloat));
  const auto dtype = A.scalar_type() == at::kHalf       ? InputDtype::kFloat16
                     : A.scalar_type() == at::kBFloat16 ? InputDtype::kBFloat16
                                                        : InputDtype::kFloat32;
  const cudaError_t err = launch_gram_linear(
      A.const_data_ptr(), A.stride(0), A.stride(1), A.size(1), E.const_data_ptr(), E.stride(0),
      E.stride(1), E.size(1), A.size(0), bias, dtype, K.data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
  return K;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_native, CUDA, m) { m.impl("gram_linear", &gram_linear_cuda); }

}  // namespace lowrank
