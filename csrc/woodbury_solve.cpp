// lowrank_kernels::woodbury_solve, registered on the public schema (declared in
// lowrank_kernels/ops/woodbury_solve.py): the argument checks and batching shared by both
// devices, the CPU kernel — X = (K + λ'I)⁻¹ R per batch member (λ' = λ or the first rung of the
// jitter ladder that factors), in parallel over the members, each by LAPACK (potrf + trsm)
// from n = 32 and otherwise, or when LAPACK fails it, by the shared core
// (lowrank/woodbury_core.h) with SerialExec, the same schedule every thread of the CUDA kernel
// follows — and, in CUDA builds, the CUDA glue: outputs, workspace and the launch of the
// torch-free fused kernel (cuda/woodbury_solve.cu) on the current stream.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/BatchLinearAlgebra.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "lowrank/woodbury_core.h"
#ifdef LOWRANK_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace lowrank {
namespace {

// The op's arguments as the kernels take them: K (b, n, n), damping (b) in K's dtype on K's
// device, R (b, n, r); `vector_rhs` / `batched` say how to give back X, info, damping_used.
struct WoodburyArgs {
  at::Tensor K, damping, R;
  double jitter;
  int max_tries;
  bool batched, vector_rhs;
};

WoodburyArgs woodbury_args(const at::Tensor& K, const at::Tensor& damping,
                                  const at::Tensor& R, std::optional<double> jitter,
                                  int64_t max_tries) {
  constexpr const char* kOp = "woodbury_solve";
  TORCH_CHECK_VALUE(K.dim() == 2 || K.dim() == 3, kOp, ": K must be a 2 or 3-D tensor (b x n x n or "
                    "n x n: the symmetric matrices), got shape ", K.sizes());
  TORCH_CHECK_TYPE(K.scalar_type() == at::kFloat || K.scalar_type() == at::kDouble, kOp,
                   ": K must have a floating dtype (float32, float64), got ", K.scalar_type());
  TORCH_CHECK_VALUE(K.size(-1) == K.size(-2), kOp, ": K must be square in its last two dims, "
                    "got shape ", K.sizes());
  const bool batched = K.dim() == 3;
  TORCH_CHECK_VALUE(batched ? (R.dim() == 3 || R.dim() == 2) : (R.dim() == 2 || R.dim() == 1),
                    kOp, ": R must be a ", batched ? "3 or 2" : "2 or 1", "-D tensor (",
                    batched ? "b x n x r or b x n" : "n x r or n",
                    ": the right-hand sides), got shape ", R.sizes());
  TORCH_CHECK_TYPE(R.scalar_type() == at::kFloat || R.scalar_type() == at::kDouble, kOp,
                   ": R must have a floating dtype (float32, float64), got ", R.scalar_type());
  TORCH_CHECK_VALUE(R.device() == K.device(), kOp, ": K and R must have the same device, got ",
                    K.device(), " and ", R.device());
  TORCH_CHECK_VALUE(R.scalar_type() == K.scalar_type(), kOp,
                    ": K and R must have the same dtype, got ", K.scalar_type(), " and ",
                    R.scalar_type());
  const int64_t b = batched ? K.size(0) : 1, n = K.size(-1);
  if (batched)
    TORCH_CHECK_VALUE(R.size(0) == b, kOp, ": K and R must have the same batch size b (dim 0), "
                      "got ", b, " and ", R.size(0));
  const int64_t rows = batched ? R.size(1) : R.size(0);
  TORCH_CHECK_VALUE(rows == n, kOp, ": K and R must have the same size n (K's last dim, R's "
                    "rows), got ", n, " and ", rows);
  TORCH_CHECK_VALUE(damping.dim() <= 1, kOp, ": damping must be a 0 or 1-D tensor (a float, "
                    "0-d or (b,) tensor), got shape ", damping.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(damping.scalar_type()), kOp,
                   ": damping must have a floating dtype, got ", damping.scalar_type());
  const bool cpu_scalar = damping.dim() == 0 && damping.device().is_cpu();
  TORCH_CHECK_VALUE(cpu_scalar || damping.device() == K.device(), kOp,
                    ": K and damping must have the same device, got ", K.device(), " and ",
                    damping.device());
  TORCH_CHECK_VALUE(damping.dim() == 0 || damping.size(0) == b, kOp,
                    ": damping must have one value per batch member (", b, "), got shape ",
                    damping.sizes());
  const double jit = jitter.has_value() ? *jitter
                                        : (K.scalar_type() == at::kDouble ? 1e-12 : 1e-6);
  TORCH_CHECK_VALUE(jit >= 0.0 && jit < 1e300, kOp, ": jitter must be finite and >= 0, got ",
                    jit);
  TORCH_CHECK_VALUE(max_tries >= 0 && max_tries <= 64, kOp,
                    ": max_tries must be in [0, 64], got ", max_tries);
  at::Tensor Kb = batched ? K : K.unsqueeze(0);
  const bool vector_rhs = R.dim() == K.dim() - 1;
  at::Tensor Rb = vector_rhs ? R.unsqueeze(-1) : R;
  if (!batched) Rb = Rb.unsqueeze(0);
  at::Tensor lam;
  if (cpu_scalar && !K.device().is_cpu()) {  // a CPU scalar: filled on K's device, no copy
    lam = at::full({b}, damping.item<double>(), K.options());
  } else {
    lam = damping.to(K.scalar_type());
    lam = lam.dim() == 0 ? lam.expand({b}) : lam;
  }
  // A value the kernels cannot use (negative, NaN, Inf) gives that member info = -3 there:
  // checked on the device, no host sync.
  return {Kb, lam, Rb, jit, static_cast<int>(max_tries), batched, vector_rhs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> woodbury_unbatch(
    const WoodburyArgs& a, at::Tensor X, at::Tensor info, at::Tensor used) {
  if (a.vector_rhs) X = X.squeeze(-1);
  if (!a.batched) return {X[0], info[0], used[0]};
  return {X, info, used};
}


// ---- CPU ----------------------------------------------------------------------------------
#if AT_BUILD_WITH_LAPACK() && AT_BUILD_WITH_BLAS()
// Where LAPACK (potrf + two trsm per member, lapack_member) is faster than the core on a CPU.
// Measured, 1 thread, fp32 and fp64, b = 1 and 8, r = 1, 4, 16 (time LAPACK / core): 0.41-0.72
// at n = 32, 48, 64, 96, 128 (0.13-0.15 at b = 8, n = 128, r = 16); below n = 32 the core
// (tiny members: what the CUDA kernel runs, bit-for-bit, column by column of R).
constexpr bool kLapack = true;
bool lapack_first(int64_t n) { return n >= 32; }

// One member by LAPACK: a = the damped lower triangle of K, copied once (row-major lower =
// column-major upper, so potrf with uplo 'U' gives A = UᵀU); x = R copied, then, seen
// column-major as Xᵀ (r × n), solved in place from the right: Xᵀ U⁻¹, then · U⁻ᵀ, so that
// Xᵀ = Rᵀ A⁻¹; X = x. a (n²) and x (n r) are the thread's 64-byte aligned buffers, so that a
// member's rounding does not depend on where it lies in the batch (MKL's may depend on
// alignment). False (X unspecified) when potrf fails or X is not finite.
template <typename T>
bool lapack_member(const core::WbMember<T>& m, T* a, T* x) {
  const index_t n = m.n, r = m.r;
  const int ni = static_cast<int>(n), ri = static_cast<int>(r);
  for (index_t i = 0; i < n; ++i) {
    const T* row = m.K + i * m.ks0;
    for (index_t k = 0; k <= i; ++k) a[i * n + k] = row[k * m.ks1];
    a[i * n + i] += m.damping;
  }
  int status = 0;
  at::native::lapackCholesky<T>('U', ni, a, ni, &status);
  if (status != 0) return false;
  for (index_t i = 0; i < n; ++i)
    for (index_t j = 0; j < r; ++j) x[i * r + j] = m.R[i * m.rs0 + j * m.rs1];
  at::native::blasTriangularSolve<T>('R', 'U', 'N', 'N', ri, ni, a, ni, x, ri);
  at::native::blasTriangularSolve<T>('R', 'U', 'T', 'N', ri, ni, a, ni, x, ri);
  bool finite = true;
  for (index_t e = 0; e < n * r; ++e) finite &= core::wb_finite(x[e]);
  if (finite) std::copy(x, x + n * r, m.X);
  return finite;
}
#else
constexpr bool kLapack = false;
bool lapack_first(int64_t) { return false; }
template <typename T>
bool lapack_member(const core::WbMember<T>&, T*, T*) { return false; }
#endif

// Member by member, in parallel over the members: LAPACK first where it is faster
// (lapack_first); a member it does not solve with a finite X (not positive definite, NaN/Inf,
// a bad damping, overflow) — and every member where the core is faster — by the core, which
// climbs the jitter ladder and sets the info codes (the schedule of the CUDA kernel).
template <typename T>
void woodbury_solve_cpu_impl(const at::Tensor& K, const at::Tensor& damping, const at::Tensor& R,
                             double jitter, int max_tries, at::Tensor& X, at::Tensor& info,
                             at::Tensor& used) {
  const index_t b = K.size(0), n = K.size(1), r = R.size(2);
  const bool lapack = kLapack && lapack_first(n);
  const T* k = K.const_data_ptr<T>();
  const T* rhs = R.const_data_ptr<T>();
  const T* lam = damping.const_data_ptr<T>();
  T* x = X.data_ptr<T>();
  int* inf = info.data_ptr<int>();
  T* du = used.data_ptr<T>();
  at::parallel_for(0, b, 1, [&](index_t begin, index_t end) {
    const at::Tensor a_buf = at::empty({lapack ? n * n : 0}, K.options());
    const at::Tensor x_buf = at::empty({lapack ? n * r : 0}, K.options());
    T* a = a_buf.data_ptr<T>();
    T* xb = x_buf.data_ptr<T>();
    std::vector<T> tiles, ldiag, linv;
    core::SerialExec ex;
    for (index_t i = begin; i < end; ++i) {
      const T d = lam[i * damping.stride(0)];
      const core::WbMember<T> m{k + i * K.stride(0), K.stride(1), K.stride(2),
                                rhs + i * R.stride(0), R.stride(1), R.stride(2),
                                x + i * n * r, n, r, d, jitter, max_tries};
      if (lapack && d >= T(0) && core::wb_finite(d) && lapack_member(m, a, xb)) {
        inf[i] = 0;
        du[i] = d;
        continue;
      }
      if (tiles.empty()) {
        tiles.resize(core::wb_storage_elems(n));
        ldiag.resize(core::kWbTile);
        linv.resize(core::kWbTile);
      }
      core::woodbury_solve_member(ex, m, core::WbScratch<T>{tiles.data(), ldiag.data(),
                                                            linv.data()}, inf + i, du + i);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> woodbury_solve_cpu(const at::Tensor& K_in,
                                                                  const at::Tensor& damping_in,
                                                                  const at::Tensor& R_in,
                                                                  std::optional<double> jitter,
                                                                  int64_t max_tries) {
  const WoodburyArgs a = woodbury_args(K_in, damping_in, R_in, jitter, max_tries);
  const at::Tensor &K = a.K, &R = a.R;
  at::Tensor X = at::empty({R.size(0), R.size(1), R.size(2)}, R.options());
  at::Tensor info = at::empty({K.size(0)}, K.options().dtype(at::kInt));
  at::Tensor used = at::empty({K.size(0)}, K.options());
  const bool fp64 = K.scalar_type() == at::kDouble;
  if (fp64) {
    woodbury_solve_cpu_impl<double>(K, a.damping, R, a.jitter, a.max_tries, X, info, used);
  } else {
    woodbury_solve_cpu_impl<float>(K, a.damping, R, a.jitter, a.max_tries, X, info, used);
  }
  return woodbury_unbatch(a, X, info, used);
}

#ifdef LOWRANK_WITH_CUDA
// ---- CUDA ---------------------------------------------------------------------------------
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
#endif

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_kernels, CPU, m) { m.impl("woodbury_solve", &woodbury_solve_cpu); }
#ifdef LOWRANK_WITH_CUDA
TORCH_LIBRARY_IMPL(lowrank_kernels, CUDA, m) { m.impl("woodbury_solve", &woodbury_solve_cuda); }
#endif

}  // namespace lowrank
