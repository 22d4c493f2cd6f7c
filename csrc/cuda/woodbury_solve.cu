// Fused CUDA kernel of the batched Woodbury solve X = (K + λI)⁻¹ R: one block per batch member
// loads the damped lower triangle of K into 16×16 tiles — in shared memory when they fit (n ≤ 320
// in fp32, n ≤ 224 in fp64, with the 227 KiB of an sm_90 block), else in a global workspace that
// stays in L2 — factors it with a blocked right-looking Cholesky with look-ahead (each diagonal
// tile by warp 0 in lock-step while the other warps run the trailing update by 4×4 register
// micro-tiles; panel rows one thread each), runs the forward and backward substitutions on the
// output in place, and climbs the jitter ladder in the same launch when the factorization fails.
// The arithmetic and the schedule are the shared core (lowrank/woodbury_core.h), run here with
// BlockExec; the CPU kernel and the ctest run the same schedule serially (and in random orders,
// to show it is free of races).
#include "lowrank/woodbury_core.h"
#include "woodbury_solve.cuh"

namespace lowrank {
namespace {

// core::woodbury_solve_member's execution policy for one thread block.
struct BlockExec {
  template <typename F>
  __device__ void for_each(index_t count, F&& f) {
    for (index_t e = threadIdx.x; e < count; e += blockDim.x) f(e);
    __syncthreads();
  }
  template <typename F>
  __device__ bool for_each_any(index_t count, F&& f) {
    int any = 0;
    for (index_t e = threadIdx.x; e < count; e += blockDim.x) any |= f(e) ? 1 : 0;
    return __syncthreads_or(any) != 0;
  }
  // Warp 0 runs the column steps; warps 1.. run g's items meanwhile.
  template <typename F, typename G>
  __device__ int column_steps(int steps, F&& f, index_t count, G&& g) {
    __shared__ int failed_step;
    if (threadIdx.x < 32) {
      const int lane = threadIdx.x;
      int failed = -1;
      for (int c = 0; c < steps; ++c) {
        if (!f(c, lane)) {  // every lane reads the same pivot: the warp agrees
          failed = c;
          break;
        }
        __syncwarp();
      }
      if (lane == 0) failed_step = failed;
    } else {
      for (index_t e = threadIdx.x - 32; e < count; e += blockDim.x - 32) g(e);
    }
    __syncthreads();
    const int result = failed_step;
    __syncthreads();
    return result;
  }
  template <typename F>
  __device__ double uniform(F&& f) {
    __shared__ double value;
    if (threadIdx.x == 0) value = f();
    __syncthreads();
    const double result = value;
    __syncthreads();
    return result;
  }
  template <typename F>
  __device__ void single(F&& f) {
    if (threadIdx.x == 0) f();
    __syncthreads();
  }
};

constexpr int kMaxThreads = 512;

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) woodbury_solve_kernel(WoodburyLaunch a) {
  extern __shared__ __align__(16) unsigned char dynamic_smem[];
  __shared__ T ldiag[core::kWbTile];
  __shared__ T linv[core::kWbTile];
  const index_t member = blockIdx.x;
  T* tiles = a.workspace != nullptr
                 ? static_cast<T*>(a.workspace) + member * core::wb_storage_elems(a.n)
                 : reinterpret_cast<T*>(dynamic_smem);
  const core::WbMember<T> m{static_cast<const T*>(a.K) + member * a.k0,
                            a.k1,
                            a.k2,
                            static_cast<const T*>(a.R) + member * a.r0,
                            a.r1,
                            a.r2,
                            static_cast<T*>(a.X) + member * a.n * a.r,
                            a.n,
                            a.r,
                            static_cast<const T*>(a.damping)[member * a.d0],
                            a.jitter,
                            a.max_tries};
  BlockExec ex;
  core::woodbury_solve_member(ex, m, core::WbScratch<T>{tiles, ldiag, linv}, a.info + member,
                              static_cast<T*>(a.damping_used) + member);
}

cudaError_t shared_bytes_limit(int* limit) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
}

// Bytes of one member's tiles, and whether they go to shared memory.
cudaError_t tile_placement(index_t n, bool fp64, index_t* tile_bytes, bool* in_shared) {
  int limit = 0;
  const cudaError_t err = shared_bytes_limit(&limit);
  if (err != cudaSuccess) return err;
  *tile_bytes = core::wb_storage_elems(n) * (fp64 ? 8 : 4);
  // Static shared memory of the kernel (ldiag, linv and the exec scalars) comes on top.
  *in_shared = *tile_bytes + 1024 <= limit;
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_typed(const WoodburyLaunch& a, cudaStream_t stream) {
  index_t tile_bytes = 0;
  bool in_shared = false;
  cudaError_t err = tile_placement(a.n, a.fp64, &tile_bytes, &in_shared);
  if (err != cudaSuccess) return err;
  if (!in_shared && a.workspace == nullptr) return cudaErrorInvalidValue;
  const int smem = in_shared ? static_cast<int>(tile_bytes) : 0;
  WoodburyLaunch args = a;
  if (in_shared) args.workspace = nullptr;
  err = cudaFuncSetAttribute(woodbury_solve_kernel<T>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const index_t padded = core::wb_tiles(a.n) * core::kWbTile;
  const int threads = padded <= 64 ? 128 : padded <= 128 ? 256 : kMaxThreads;
  if (a.b > 2147483647) return cudaErrorInvalidValue;
  woodbury_solve_kernel<T>
      <<<static_cast<unsigned>(a.b), threads, static_cast<size_t>(smem), stream>>>(args);
  return cudaGetLastError();
}

}  // namespace

cudaError_t woodbury_workspace_bytes(index_t b, index_t n, bool fp64, index_t* bytes) {
  index_t tile_bytes = 0;
  bool in_shared = false;
  const cudaError_t err = tile_placement(n, fp64, &tile_bytes, &in_shared);
  *bytes = in_shared ? 0 : b * tile_bytes;
  return err;
}

cudaError_t launch_woodbury_solve(const WoodburyLaunch& args, cudaStream_t stream) {
  if (args.b == 0) return cudaSuccess;
  return args.fp64 ? launch_typed<double>(args, stream) : launch_typed<float>(args, stream);
}

}  // namespace lowrank
