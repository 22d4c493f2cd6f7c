// Argument checks of lowrank_native::woodbury_solve shared by its CPU kernel and its CUDA
// glue (the Python op runs the same checks first; these guard direct calls of the native op).
#pragma once
#include <torch/library.h>

namespace lowrank {

inline void check_woodbury_args(const at::Tensor& K, const at::Tensor& damping,
                                const at::Tensor& R, int64_t max_tries, double jitter,
                                bool cuda) {
  constexpr const char* kOp = "lowrank_native::woodbury_solve";
  TORCH_CHECK(K.dim() == 3 && K.size(1) == K.size(2), kOp,
              ": K must be a 3-D tensor (b x n x n), got shape ", K.sizes());
  TORCH_CHECK(R.dim() == 3 && R.size(0) == K.size(0) && R.size(1) == K.size(1), kOp,
              ": R must be a 3-D tensor (b x n x r) matching K ", K.sizes(), ", got shape ",
              R.sizes());
  TORCH_CHECK(damping.dim() == 1 && damping.size(0) == K.size(0), kOp,
              ": damping must be a 1-D tensor of b = ", K.size(0), " values, got shape ",
              damping.sizes());
  TORCH_CHECK(K.scalar_type() == at::kFloat || K.scalar_type() == at::kDouble, kOp,
              ": K must be float32 or float64, got ", K.scalar_type());
  TORCH_CHECK(R.scalar_type() == K.scalar_type() && damping.scalar_type() == K.scalar_type(),
              kOp, ": K, damping and R must have the same dtype, got ", K.scalar_type(), ", ",
              damping.scalar_type(), " and ", R.scalar_type());
  TORCH_CHECK(K.is_cuda() == cuda && R.device() == K.device() && damping.device() == K.device(),
              kOp, ": K, damping and R must be on the same ", cuda ? "CUDA" : "CPU",
              " device, got ", K.device(), ", ", damping.device(), " and ", R.device());
  TORCH_CHECK(max_tries >= 0 && max_tries <= 64, kOp,
              ": max_tries must be in [0, 64], got ", max_tries);
  TORCH_CHECK(jitter >= 0.0 && jitter < 1e300, kOp,
              ": jitter must be finite and >= 0, got ", jitter);
}

}  // namespace lowrank
