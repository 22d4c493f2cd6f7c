// CPU kernel of lowrank_kernels::woodbury_solve: X = (K + λ'I)⁻¹ R per batch member (λ' = λ or
// the first rung of the jitter ladder that factors), in parallel over the members. Each member
// runs the shared core (lowrank/woodbury_core.h) with SerialExec — the same schedule, tile by
// tile and item by item, that every thread of the CUDA kernel follows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "lowrank/woodbury_checks.h"
#include "lowrank/woodbury_core.h"

namespace lowrank {
namespace {

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
  if (K.scalar_type() == at::kDouble) {
    woodbury_solve_cpu_impl<double>(K, a.damping, R, a.jitter, a.max_tries, X, info, used);
  } else {
    woodbury_solve_cpu_impl<float>(K, a.damping, R, a.jitter, a.max_tries, X, info, used);
  }
  return woodbury_unbatch(a, X, info, used);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_kernels, CPU, m) { m.impl("woodbury_solve", &woodbury_solve_cpu); }

}  // namespace lowrank
