// lowrank_kernels::weighted_sum_embedding's CPU kernel, registered on the public schema
// (declared in lowrank_kernels/ops/weighted_sum_embedding.py):
//
//     (U C)[m, r] = Σ_{i,t: idx_it = r ≠ padding} C_im e_it,
//
// each output row written once: the tokens bucketed by table row (a counting sort), then every
// (direction, row) pair — zero (a run of rows without tokens in one store), or the sum of its
// tokens' scaled rows in token order, each token row read once for the m directions — by
// chunks of rows in parallel; an output larger than a cache written around it. No zero fill of the table followed by a scatter (one pass over the
// output instead of two), no scaled copies of E.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

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

// An output larger than this many bytes is written around the cache (non-temporal stores, as
// glibc's memset does for large sizes): no read of each line before it is written.
constexpr index_t kStreamBytes = index_t(1) << 23;

// dst[0:n) = src[0:n), or zeros where src is null; by non-temporal stores where `stream`
// (the caller fences).
template <typename S>
void store(S* dst, const S* src, index_t n, bool stream) {
#if defined(__SSE2__)
  if (stream) {
    char* p = reinterpret_cast<char*>(dst);
    const char* q = reinterpret_cast<const char*>(src);
    const index_t bytes = n * static_cast<index_t>(sizeof(S));
    const index_t head = std::min<index_t>(bytes, (16 - reinterpret_cast<std::uintptr_t>(p) % 16) % 16);
    index_t k = 0;
    const auto plain = [&](index_t from, index_t to) {
      if (to > from) q ? std::memcpy(p + from, q + from, to - from) : std::memset(p + from, 0, to - from);
    };
    plain(0, head);
    for (k = head; k + 16 <= bytes; k += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(p + k),
                       q ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k))
                         : _mm_setzero_si128());
    plain(k, bytes);
    return;
  }
#endif
  if (src)
    std::copy(src, src + n, dst);
  else
    std::fill(dst, dst + n, S(0));
}

template <typename S>
void weighted_sum_rows(const int64_t* rows, const S* e, const S* C, index_t n_tok, index_t T,
                       index_t d, index_t m, int64_t N, int64_t pad, S* out) {
  std::vector<index_t> end, order;
  bucket_by_row(rows, n_tok, N, pad, end, order);
  std::vector<index_t> sample(order.size());  // the sample of each bucketed token
  for (size_t a = 0; a < order.size(); ++a) sample[a] = order[a] / T;
  const bool stream = m * N * d * static_cast<index_t>(sizeof(S)) > kStreamBytes;
  // Rows of a task (all m directions): about 16k output entries.
  const index_t chunk = std::max<index_t>(1, (1 << 14) / std::max<index_t>(m * d, 1));
  at::parallel_for(0, (N + chunk - 1) / chunk, 1, [&](index_t lo, index_t hi) {
    std::vector<S> sums(stream ? m * d : 0);  // a row's m sums, streamed out once complete
    const auto zeros = [&](index_t from, index_t to) {  // rows [from, to) of every direction
      for (index_t dir = 0; dir < m; ++dir)
        store<S>(out + (dir * N + from) * d, nullptr, (to - from) * d, stream);
    };
    for (index_t task = lo; task < hi; ++task) {
      const index_t r0 = task * chunk, r1 = std::min<index_t>(N, r0 + chunk);
      index_t zeros_from = r0;  // rows [zeros_from, r) have no tokens: one store of zeros
      for (index_t r = r0; r < r1; ++r) {
        const index_t first = r ? end[r - 1] : 0, last = end[r];
        if (first == last) continue;
        zeros(zeros_from, r);
        zeros_from = r + 1;
        // sum(dir) = Σ_tokens C[i, dir] e_it: each token's row read once for all directions.
        const auto sum = [&](index_t dir) {
          return stream ? sums.data() + dir * d : out + (dir * N + r) * d;
        };
        for (index_t dir = 0; dir < m; ++dir) std::fill(sum(dir), sum(dir) + d, S(0));
        for (index_t a = first; a < last; ++a) {
          const S* x = e + order[a] * d;
          const S* w = C + sample[a] * m;
          for (index_t dir = 0; dir < m; ++dir) {
            S* o = sum(dir);
            const S wd = w[dir];
            for (index_t k = 0; k < d; ++k) o[k] += wd * x[k];
          }
        }
        if (stream)
          for (index_t dir = 0; dir < m; ++dir) store(out + (dir * N + r) * d, sum(dir), d, true);
      }
      zeros(zeros_from, r1);
    }
#if defined(__SSE2__)
    if (stream) _mm_sfence();
#endif
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
