// lowrank_kernels::woodbury_solve, registered on the public schema (declared in
// lowrank_kernels/ops/woodbury_solve.py): the argument checks and batching shared by both
// devices, the CPU kernel — X = (K + λ'I)⁻¹ R per batch member (λ' = λ or the first rung of the
// jitter ladder that factors), in parallel over the members, each running the shared core
// (lowrank/woodbury_core.h) with SerialExec, the same schedule every thread of the CUDA kernel
// follows — and, in CUDA builds, the CUDA glue: outputs, workspace and the launch of the
// torch-free fused kernel (cuda/woodbury_solve.cu) on the current stream.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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
// Small members: the core, member by member in parallel (the schedule of the CUDA kernel).
template <typename T>
void woodbury_solve_cpu_impl(const at::Tensor& K, const at::Tensor& damping, const at::Tensor& R,
                             double jitter, int max_tries, at::Tensor& X, at::Tensor& info,
                             at::Tensor& used) {
  const index_t b = K.size(0), n = K.size(1), r = R.size(2);
  const T* k = K.const_data_ptr<T>();
  const T* rhs = R.const_data_ptr<T>();
  const T* lam = damping.const_data_ptr<T>();
  T* x = X.data_ptr<T>();
  int* inf = info.data_ptr<int>();
  T* du = used.data_ptr<T>();
  at::parallel_for(0, b, 1, [&](index_t begin, index_t end) {
    std::vector<T> tiles(core::wb_storage_elems(n)), ldiag(core::kWbTile), linv(core::kWbTile);
    core::SerialExec ex;
    for (index_t i = begin; i < end; ++i) {
      const core::WbMember<T> m{k + i * K.stride(0), K.stride(1), K.stride(2),
                                rhs + i * R.stride(0), R.stride(1), R.stride(2),
                                x + i * n * r, n, r, lam[i * damping.stride(0)], jitter,
                                max_tries};
      core::woodbury_solve_member(ex, m, core::WbScratch<T>{tiles.data(), ldiag.data(),
                                                            linv.data()},
                                  inf + i, du + i);
    }
  });
}

// Where LAPACK's blocked Cholesky (torch.linalg.cholesky_ex + cholesky_solve) is faster than
// the per-member core on a CPU (measured: n ≥ 192, or n ≥ 96 with r ≥ 8).
bool lapack_first(int64_t n, int64_t r) { return n >= 192 || (n >= 96 && r >= 8); }

// The first rung of every member by LAPACK; the members it does not solve with a finite X
// (not positive definite, NaN/Inf, a bad damping, overflow) are redone by the core, which
// climbs the jitter ladder and sets their info codes.
template <typename T>
void woodbury_solve_lapack(const at::Tensor& K, const at::Tensor& damping, const at::Tensor& R,
                           double jitter, int max_tries, at::Tensor& X, at::Tensor& info,
                           at::Tensor& used) {
  at::Tensor M = K.clone();  // potrf (uplo 'L') reads only the lower triangle
  M.diagonal(0, -2, -1).add_(damping.unsqueeze(-1));
  auto [L, status] = at::linalg_cholesky_ex(M, /*upper=*/false, /*check_errors=*/false);
  X.copy_(at::cholesky_solve(R, L, /*upper=*/false));
  const at::Tensor redo = (status != 0) | at::isfinite(X).flatten(1).all(1).logical_not() |
                          (damping >= 0).logical_and(at::isfinite(damping)).logical_not();
  info.zero_();
  used.copy_(damping);
  const at::Tensor members = redo.nonzero().flatten();
  if (members.numel() == 0) return;
  const index_t n = K.size(1), r = R.size(2);
  const int64_t* ids = members.const_data_ptr<int64_t>();
  const T* k = K.const_data_ptr<T>();
  const T* rhs = R.const_data_ptr<T>();
  const T* lam = damping.const_data_ptr<T>();
  T* x = X.data_ptr<T>();
  int* inf = info.data_ptr<int>();
  T* du = used.data_ptr<T>();
  std::vector<T> tiles(core::wb_storage_elems(n)), ldiag(core::kWbTile), linv(core::kWbTile);
  core::SerialExec ex;
  for (int64_t q = 0; q < members.numel(); ++q) {
    const index_t i = ids[q];
    const core::WbMember<T> m{k + i * K.stride(0), K.stride(1), K.stride(2),
                              rhs + i * R.stride(0), R.stride(1), R.stride(2), x + i * n * r,
                              n, r, lam[i * damping.stride(0)], jitter, max_tries};
    core::woodbury_solve_member(ex, m, core::WbScratch<T>{tiles.data(), ldiag.data(),
                                                          linv.data()}, inf + i, du + i);
  }
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
  if (K.size(0) > 0 && lapack_first(K.size(1), R.size(2))) {
    const at::Tensor lam = a.damping.contiguous();
    if (fp64) {
      woodbury_solve_lapack<double>(K, lam, R, a.jitter, a.max_tries, X, info, used);
    } else {
      woodbury_solve_lapack<float>(K, lam, R, a.jitter, a.max_tries, X, info, used);
    }
  } else if (fp64) {
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
