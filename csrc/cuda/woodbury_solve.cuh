// Launcher of the fused CUDA kernel of the batched Woodbury solve X = (K + λI)⁻¹ R (damping,
// blocked Cholesky, both triangular solves and the jitter ladder in one launch, one block per
// batch member). Torch-free: raw pointers, sizes and strides in elements.
#pragma once
#include <cuda_runtime.h>

#include "lowrank/hd.h"

namespace lowrank {

struct WoodburyLaunch {
  const void* K;  // b x n x n, strides k0, k1, k2; only the lower triangle (k <= i) is read
  index_t k0, k1, k2;
  const void* damping;  // b values, stride d0
  index_t d0;
  const void* R;  // b x n x r, strides r0, r1, r2
  index_t r0, r1, r2;
  index_t b, n, r;
  double jitter;
  int max_tries;
  bool fp64;           // float64 when true, else float32 (every tensor argument alike)
  void* X;             // b x n x r contiguous
  int* info;           // b
  void* damping_used;  // b
  void* workspace;     // woodbury_workspace_bytes(...) bytes (nullptr when that is 0)
};

// Global-memory workspace the launch needs: 0 when a member's tiles fit in the shared memory of
// the current device, else b times their size.
cudaError_t woodbury_workspace_bytes(index_t b, index_t n, bool fp64, index_t* bytes);

cudaError_t launch_woodbury_solve(const WoodburyLaunch& args, cudaStream_t stream);

}  // namespace lowrank
