// lowrank_kernels::project_embedding's CPU kernel, registered on the public schema (declared in
// lowrank_kernels/ops/project_embedding.py):
//
//     (Uᵀ V)_{i,m} = Σ_t [idx_it ≠ padding] e_it · V_m[idx_it],
//
// one d-long dot per (sample, direction, token), read straight from V's rows (no gathered copy
// of them), the (sample, direction) pairs in parallel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "lowrank/embedding_args.h"

namespace lowrank {
namespace {

namespace emb = embedding;

template <typename S>
void project_rows(const int64_t* rows, const S* e, const S* V, index_t v_dir, index_t v_row,
                  index_t B, index_t T, index_t d, index_t m, int64_t pad, S* out) {
  const index_t grain = std::max<index_t>(1, (1 << 14) / std::max<index_t>(T * d, 1));
  at::parallel_for(0, B * m, grain, [&](index_t lo, index_t hi) {
    for (index_t q = lo; q < hi; ++q) {
      const index_t i = q / m, dir = q % m;
      const S* v = V + dir * v_dir;
      S s = 0;
      for (index_t t = 0; t < T; ++t) {
        const int64_t r = rows[i * T + t];
        if (r != pad) s += emb::dot(e + (i * T + t) * d, v + r * v_row, d);
      }
      out[q] = s;
    }
  });
}

at::Tensor project_embedding_cpu(const at::Tensor& idx, const at::Tensor& E, const at::Tensor& V,
                                 std::optional<int64_t> padding_idx) {
  constexpr const char* op = "project_embedding";
  emb::check_idx_E(op, "idx", idx, "E", E);
  emb::check_ndim(op, "V", V, 2, 3, "num_embeddings x d or m x num_embeddings x d");
  emb::check_float(op, "V", V);
  emb::check_same_device(op, "E", E, "V", V);
  emb::check_dim_match(op, "E", E.size(2), "V", V.size(-1), "embedding dim d (last dim)");
  const int64_t N = V.size(-2);
  const int64_t pad = emb::checked_padding(op, N, padding_idx);
  const at::Tensor rows = idx.contiguous();
  emb::check_index_range(op, "idx", rows.const_data_ptr<int64_t>(), rows.numel(), N);
  const auto acc = emb::acc_type(E);
  const at::Tensor e = E.to(acc).contiguous();
  at::Tensor Vm = (V.dim() == 3 ? V : V.unsqueeze(0)).to(acc);
  if (Vm.stride(2) != 1) Vm = Vm.contiguous();  // rows read as contiguous vectors
  const index_t B = idx.size(0), T = idx.size(1), d = E.size(2), m = Vm.size(0);
  at::Tensor out = at::empty({B, m}, E.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, op, [&] {
    project_rows<scalar_t>(rows.const_data_ptr<int64_t>(), e.const_data_ptr<scalar_t>(),
                           Vm.const_data_ptr<scalar_t>(), Vm.stride(0), Vm.stride(1), B, T, d,
                           m, pad, out.data_ptr<scalar_t>());
  });
  return V.dim() == 3 ? out : out.view({B});
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_kernels, CPU, m) {
  m.impl("project_embedding", &project_embedding_cpu);
}

}  // namespace lowrank
