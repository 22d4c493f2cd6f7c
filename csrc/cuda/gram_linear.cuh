// Launcher of the CUDA kernel for K = (A A^T + bias) ⊙ (E E^T). Torch-free: raw pointers,
// sizes and strides in elements, so the .cu compiles with nothing but the CUDA toolkit.
#pragma once
#include <cuda_runtime.h>

#include "lowrank/hd.h"

namespace lowrank {

enum class InputDtype { kFloat32, kFloat16, kBFloat16 };

// A: B x d_in (strides sa0, sa1), E: B x d_out (strides se0, se1), K: B x B row-major fp32.
cudaError_t launch_gram_linear(const void* A, index_t sa0, index_t sa1, index_t d_in,
                               const void* E, index_t se0, index_t se1, index_t d_out,
                               index_t B, bool bias, InputDtype dtype, float* K,
                               cudaStream_t stream);

}  // namespace lowrank
