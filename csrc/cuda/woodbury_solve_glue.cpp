// CUDA registration of lowrank_kernels::woodbury_solve: checks, outputs and workspace, and the
// launch of the torch-free fused kernel in woodbury_solve.cu on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "lowrank/woodbury_checks.h"
#include "woodbury_solve.cuh"

namespace lowrank {
namespace {

constexpr const char* kOp = "woodbury_solve";

std::tuple<at::Tensor, at::Tensor, at::Tensor> woodbury_solve_cuda(const at::Tensor& K_in,
                                                                   const at::Tensor& damping_in,
                                                                   const at::Tensor& R_in,
                                                                   std::optional<double> jitter_in,
                                                                   int64_t max_tries_in) {
  const c10::cuda::CUDAGuard guard(K_in.device());
  const WoodburyArgs a = woodbury_args(K_in, damping_in, R_in, jitter_in, max_tries_in);
  const at::Tensor &K = a.K, &R = a.R, &damping = a.damping;
  const double jitter = a.jitter;
  const int max_tries = a.max_tries;
  at::Tensor X = at::empty({R.size(0), R.size(1), R.size(2)}, R.options());
  at::Tensor info = at::empty({K.size(0)}, K.options().dtype(at::kInt));
  at::Tensor used = at::empty({K.size(0)}, K.options());
  const bool fp64 = K.scalar_type() == at::kDouble;
  index_t bytes = 0;
  cudaError_t err = woodbury_workspace_bytes(K.size(0), K.size(1), fp64, &bytes);
  TORCH_CHECK(err == cudaSuccess, kOp, ": ", cudaGetErrorString(err));
  at::Tensor workspace;
  if (bytes > 0) workspace = at::empty({bytes}, K.options().dtype(at::kByte));
  WoodburyLaunch args{K.const_data_ptr(), K.stride(0), K.stride(1), K.stride(2),
                      damping.const_data_ptr(), damping.stride(0),
                      R.const_data_ptr(), R.stride(0), R.stride(1), R.stride(2),
                      K.size(0), K.size(1), R.size(2), jitter, max_tries, fp64,
                      X.data_ptr(), info.data_ptr<int>(), used.data_ptr(),
                      bytes > 0 ? workspace.data_ptr() : nullptr};
  err = launch_woodbury_solve(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, kOp, ": CUDA launch failed: ", cudaGetErrorString(err));
  return woodbury_unbatch(a, X, info, used);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_kernels, CUDA, m) { m.impl("woodbury_solve", &woodbury_solve_cuda); }

}  // namespace lowrank
