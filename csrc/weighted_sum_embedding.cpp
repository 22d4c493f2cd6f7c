// lowrank_kernels::weighted_sum_embedding's CPU kernel, registered on the public schema
// (declared in lowrank_kernels/ops/weighted_sum_embedding.py):
//
//     (U C)[m, r] = Σ_{i,t: idx_it = r ≠ padding} C_im e_it,
//
// each output row written once: the tokens bucketed by table row (a counting sort), then every
// (direction, row) pair — zero, or the sum of its tokens' scaled rows in token order — in
// parallel. No zero fill of the table followed by a scatter (one pass over the output instead
// of two), no scaled copies of E.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "lowrank/embedding_args.h"

namespace lowrank {
namespace {

namespace emb = embedding;

// end[r]: one past the last token of row r in `order` (row r's tokens: order[end[r-1]:end[r]]),
// padding tokens left out.
void bucket_by_row(const int64_t* rows, index_t n, int64_t N, int64_t pad,
                   std::vector<index_t>& end, std::vector<index_t>& order) {
  end.assign(N, 0);
  index_t used = 0;
  for (index_t k = 0; k < n; ++k)
    if (rows[k] != pad) ++end[rows[k]], ++used;
  for (int64_t r = 0, run = 0; r < N; ++r) run += end[r], end[r] = run - end[r];  // begins
  order.resize(used);
  for (index_t k = 0; k < n; ++k)
    if (rows[k] != pad) order[end[rows[k]]++] = k;  // end[r] runs from begin(r) to end(r)
}

template <typename S>
void weighted_sum_rows(const int64_t* rows, const S* e, const S* C, index_t n_tok, index_t T,
                       index_t d, index_t m, int64_t N, int64_t pad, S* out) {
  std::vector<index_t> end, order;
  bucket_by_row(rows, n_tok, N, pad, end, order);
  const index_t grain = std::max<index_t>(1, (1 << 14) / std::max<index_t>(d, 1));
  at::parallel_for(0, m * N, grain, [&](index_t lo, index_t hi) {
    for (index_t q = lo; q < hi; ++q) {
      const index_t dir = q / N, r = q % N;
      S* o = out + q * d;
      const index_t first = r ? end[r - 1] : 0, last = end[r];
      if (first == last) {
        std::fill(o, o + d, S(0));
        continue;
      }
      for (index_t a = first; a < last; ++a) {
        const index_t tok = order[a];
        const S w = C[(tok / T) * m + dir];
        const S* x = e + tok * d;
        if (a == first)
          for (index_t k = 0; k < d; ++k) o[k] = w * x[k];
        else
          for (index_t k = 0; k < d; ++k) o[k] += w * x[k];
      }
    }
  });
}

at::Tensor weighted_sum_embedding_cpu(const at::Tensor& idx, const at::Tensor& E,
                                      const at::Tensor& c, int64_t num_embeddings,
                                      std::optional<int64_t> padding_idx) {
  constexpr const char* op = "weighted_sum_embedding";
  emb::check_idx_E(op, "idx", idx, "E", E);
  emb::check_ndim(op, "c", c, 1, 2, "B or B x m: sample weights");
  emb::check_float(op, "c", c);
  emb::check_same_device(op, "E", E, "c", c);
  emb::check_dim_match(op, "idx", idx.size(0), "c", c.size(0), "batch size B (dim 0)");
  const int64_t pad = emb::checked_padding(op, num_embeddings, padding_idx);
  const at::Tensor rows = idx.contiguous();
  emb::check_index_range(op, "idx", rows.const_data_ptr<int64_t>(), rows.numel(),
                         num_embeddings);
  const auto acc = emb::acc_type(E);
  const at::Tensor e = E.to(acc).contiguous();
  const at::Tensor C = (c.dim() == 2 ? c : c.unsqueeze(1)).to(acc).contiguous();
  const index_t T = idx.size(1), d = E.size(2), m = C.size(1);
  at::Tensor out = at::empty({m, num_embeddings, d}, E.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, op, [&] {
    weighted_sum_rows<scalar_t>(rows.const_data_ptr<int64_t>(), e.const_data_ptr<scalar_t>(),
                                C.const_data_ptr<scalar_t>(), rows.numel(), T, d, m,
                                num_embeddings, pad, out.data_ptr<scalar_t>());
  });
  return c.dim() == 2 ? out : out.view({num_embeddings, d});
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_kernels, CPU, m) {
  m.impl("weighted_sum_embedding", &weighted_sum_embedding_cpu);
}

}  // namespace lowrank
