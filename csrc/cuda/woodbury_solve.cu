// Fused CUDA kernel of the batched Woodbury solve X = (K + λI)⁻¹ R: one block per batch member
// loads the damped lower triangle of K into 16×16 tiles — in shared memory when they fit (n ≤ 320
// in fp32, n ≤ 224 in fp64, with the 227 KiB of an sm_90 block), else in a global workspace that
// stays in L2; the right-hand sides too when they fit beside them — factors it with a blocked
// right-looking Cholesky with look-ahead (each diagonal tile by warp 0 in lock-step while the
// other warps run the trailing update by 4×4 register micro-tiles; panel rows one thread each),
// runs the forward and backward substitutions on the output in place, and climbs the jitter
// ladder in the same launch when the factorization fails. The arithmetic and the schedule are the
// shared core (lowrank/woodbury_core.h), run here with BlockExec; the CPU kernel and the ctest run
// the same schedule serially (and in random orders, to show it is free of races).
#include "lowrank/woodbury_core.h"

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
constexpr int kStaticSharedBytes = 1024;  // ldiag, linv and the exec scalars, with room to spare

// Dynamic shared memory: [tiles, when tiles_in_shared][right-hand sides, when rhs_in_shared].
// With rhs_in_shared the member's X is worked on in shared memory and copied out at the end.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    woodbury_solve_kernel(WoodburyLaunch a, bool tiles_in_shared, bool rhs_in_shared) {
  extern __shared__ __align__(16) unsigned char dynamic_smem[];
  __shared__ T ldiag[core::kWbTile];
  __shared__ T linv[core::kWbTile];
  const index_t member = blockIdx.x;
  const index_t storage = core::wb_storage_elems(a.n);
  T* shared = reinterpret_cast<T*>(dynamic_smem);
  T* tiles = tiles_in_shared ? shared : static_cast<T*>(a.workspace) + member * storage;
  T* X = static_cast<T*>(a.X) + member * a.n * a.r;
  T* X_work = rhs_in_shared ? shared + (tiles_in_shared ? storage : 0) : X;
  const core::WbMember<T> m{static_cast<const T*>(a.K) + member * a.k0,
                            a.k1,
                            a.k2,
                            static_cast<const T*>(a.R) + member * a.r0,
                            a.r1,
                            a.r2,
                            X_work,
                            a.n,
                            a.r,
                            static_cast<const T*>(a.damping)[member * a.d0],
                            a.jitter,
                            a.max_tries};
  BlockExec ex;
  core::woodbury_solve_member(ex, m, core::WbScratch<T>{tiles, ldiag, linv}, a.info + member,
                              static_cast<T*>(a.damping_used) + member);
  if (rhs_in_shared) {  // woodbury_solve_member ends with a barrier: X_work is final
    for (index_t e = threadIdx.x; e < a.n * a.r; e += blockDim.x) X[e] = X_work[e];
  }
}

struct Placement {
  index_t tile_bytes, rhs_bytes;
  bool tiles_in_shared, rhs_in_shared;
  index_t shared_bytes() const {
    return (tiles_in_shared ? tile_bytes : 0) + (rhs_in_shared ? rhs_bytes : 0);
  }
};

// Tiles in shared memory when they fit; the right-hand sides too when they fit beside them.
cudaError_t placement(index_t n, index_t r, bool fp64, Placement* p) {
  int device = 0, limit = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  const index_t budget = static_cast<index_t>(limit) - kStaticSharedBytes;
  const index_t elem = fp64 ? 8 : 4;
  p->tile_bytes = core::wb_storage_elems(n) * elem;
  p->rhs_bytes = n * r * elem;
  p->tiles_in_shared = p->tile_bytes <= budget;
  p->rhs_in_shared = (p->tiles_in_shared ? p->tile_bytes : 0) + p->rhs_bytes <= budget;
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_typed(const WoodburyLaunch& a, cudaStream_t stream) {
  Placement p{};
  cudaError_t err = placement(a.n, a.r, a.fp64, &p);
  if (err != cudaSuccess) return err;
  if (!p.tiles_in_shared && a.workspace == nullptr) return cudaErrorInvalidValue;
  if (a.b > 2147483647) return cudaErrorInvalidValue;  // grid.x limit
  const int smem = static_cast<int>(p.shared_bytes());
  err = cudaFuncSetAttribute(woodbury_solve_kernel<T>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const index_t padded = core::wb_tiles(a.n) * core::kWbTile;
  const int threads = padded <= 64 ? 128 : padded <= 128 ? 256 : kMaxThreads;
  woodbury_solve_kernel<T><<<static_cast<unsigned>(a.b), threads, static_cast<size_t>(smem),
                             stream>>>(a, p.tiles_in_shared, p.rhs_in_shared);
  return cudaGetLastError();
}

}  // namespace

cudaError_t woodbury_workspace_bytes(index_t b, index_t n, bool fp64, index_t* bytes) {
  Placement p{};
  const cudaError_t err = placement(n, 0, fp64, &p);
  *bytes = p.tiles_in_shared ? 0 : b * p.tile_bytes;
  return err;
}

cudaError_t launch_woodbury_solve(const WoodburyLaunch& args, cudaStream_t stream) {
  if (args.b == 0) return cudaSuccess;
  return args.fp64 ? launch_typed<double>(args, stream) : launch_typed<float>(args, stream);
}

}  // namespace lowrank
