// CUDA kernel of the linear-layer Gram K = (A A^T + bias) ⊙ (E E^T).
// One block per 64x64 tile of K on or above the diagonal (grid is tiles x tiles; blocks
// below the diagonal exit at once); 256 threads, each a 4x4 micro-tile computed by the
// shared core on k-major shared-memory panels; fp32 accumulation, the tile is mirrored.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "gram_linear.cuh"
#include "lowrank/gram_linear_core.h"

namespace lowrank {
namespace {

constexpr int kTile = core::kGramTile;
constexpr int kChunk = core::kGramChunk;
constexpr int kMicro = 4;
constexpr int kThreadsPerEdge = kTile / kMicro;  // 16 x 16 = 256 threads

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// acc += X[row_i tile] X[row_j tile]^T over all d columns of X.
template <typename scalar_t>
__device__ void accumulate_tile(const scalar_t* X, index_t s0, index_t s1, index_t d,
                                index_t B, index_t ri, index_t rj, float (*pi)[kTile],
                                float (*pj)[kTile], float (&acc)[kMicro][kMicro]) {
  const int tid = threadIdx.y * kThreadsPerEdge + threadIdx.x;
  for (index_t k0 = 0; k0 < d; k0 += kChunk) {
    // Each thread loads kTile*kChunk/256 = 4 elements of each panel.
    for (int idx = tid; idx < kTile * kChunk; idx += kThreadsPerEdge * kThreadsPerEdge) {
      const int r = idx / kChunk, k = idx % kChunk;
      const index_t col = k0 + k;
      const index_t gi = ri + r, gj = rj + r;
      pi[k][r] = (gi < B && col < d) ? to_float(X[gi * s0 + col * s1]) : 0.0f;
      pj[k][r] = (gj < B && col < d) ? to_float(X[gj * s0 + col * s1]) : 0.0f;
    }
    __syncthreads();
    core::outer_product_accumulate<kMicro, kMicro>(&pi[0][threadIdx.y * kMicro],
                                                   &pj[0][threadIdx.x * kMicro], kChunk, kTile,
                                                   acc);
    __syncthreads();
  }
}

template <typename scalar_t>
__global__ void gram_linear_kernel(const scalar_t* A, index_t sa0, index_t sa1, index_t d_in,
                                   const scalar_t* E, index_t se0, index_t se1, index_t d_out,
                                   index_t B, bool bias, float* K) {
  if (blockIdx.y > blockIdx.x) return;  // below the diagonal: mirrored from its twin
  __shared__ float pi[kChunk][kTile];
  __shared__ float pj[kChunk][kTile];
  const index_t ri = static_cast<index_t>(blockIdx.y) * kTile;
  const index_t rj = static_cast<index_t>(blockIdx.x) * kTile;
  float acc_a[kMicro][kMicro] = {};
  float acc_e[kMicro][kMicro] = {};
  accumulate_tile(A, sa0, sa1, d_in, B, ri, rj, pi, pj, acc_a);
  accumulate_tile(E, se0, se1, d_out, B, ri, rj, pi, pj, acc_e);
#pragma unroll
  for (int r = 0; r < kMicro; ++r) {
#pragma unroll
    for (int c = 0; c < kMicro; ++c) {
      const index_t gi = ri + threadIdx.y * kMicro + r;
      const index_t gj = rj + threadIdx.x * kMicro + c;
      if (gi < B && gj < B && gi <= gj) {
        const float v = core::gram_linear_entry(acc_a[r][c], acc_e[r][c], bias);
        K[gi * B + gj] = v;
        K[gj * B + gi] = v;
      }
    }
  }
}

template <typename scalar_t>
cudaError_t launch_typed(const void* A, index_t sa0, index_t sa1, index_t d_in, const void* E,
                         index_t se0, index_t se1, index_t d_out, index_t B, bool bias, float* K,
                         cudaStream_t stream) {
  const index_t tiles = core::tile_count(B, kTile);
  if (tiles > 65535) return cudaErrorInvalidValue;  // grid.y limit: B > 4,194,240
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles));
  const dim3 block(kThreadsPerEdge, kThreadsPerEdge);
  gram_linear_kernel<scalar_t><<<grid, block, 0, stream>>>(
      static_cast<const scalar_t*>(A), sa0, sa1, d_in, static_cast<const scalar_t*>(E), se0,
      se1, d_out, B, bias, K);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gram_linear(const void* A, index_t sa0, index_t sa1, index_t d_in,
                               const void* E, index_t se0, index_t se1, index_t d_out,
                               index_t B, bool bias, InputDtype dtype, float* K,
                               cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  switch (dtype) {
    case InputDtype::kFloat16:
      return launch_typed<__half>(A, sa0, sa1, d_in, E, se0, se1, d_out, B, bias, K, stream);
    case InputDtype::kBFloat16:
      return launch_typed<__nv_bfloat16>(A, sa0, sa1, d_in, E, se0, se1, d_out, B, bias, K,
                                         stream);
    default:
      return launch_typed<float>(A, sa0, sa1, d_in, E, se0, se1, d_out, B, bias, K, stream);
  }
}

}  // namespace lowrank
