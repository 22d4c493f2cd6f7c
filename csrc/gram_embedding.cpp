// lowrank_kernels::gram_embedding's CPU kernel, registered on the public schema (declared in
// lowrank_kernels/ops/gram_embedding.py):
//
//     K_ij = Σ_{t,s} [idx_it = idx2_js ≠ padding] (e_it · e2_js),
//
// by the cheaper of two exact routes (a flop model checked against measurement,
// `used_rows_cheaper`):
// - token pair: P = E E2ᵀ over all tokens (one BLAS GEMM, 2·BT·B2T2·d flops), then K_ij the
//   sum of P over the pairs of (i, j) with equal indices;
// - used rows: the per-sample gradients restricted to the R table rows that occur,
//   M_i = [g_i[r] for the used r] (B × R·d, built by a scatter of the token rows), then
//   K = M M2ᵀ (BLAS: 2·B·B2·R·d flops; R ≤ BT, text repeats tokens), in blocks of used rows
//   of bounded size; a symmetric K by blocks of its upper triangle at B ≥ 128.
// A symmetric K is mirrored from its upper triangle (exactly symmetric). diagonal=True:
// K_ii = Σ_r g_i[r] · g2_i[r] per sample, its tokens sorted by row (O(B·T·d)).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

#include "lowrank/embedding_args.h"

namespace lowrank {
namespace {

namespace emb = embedding;

// Entries (samples × used rows × d) of one block of restricted per-sample gradients.
constexpr index_t kRowsBlock = index_t(1) << 22;
// Largest BT × B2T2 token-pair product P.
constexpr index_t kPairBlock = index_t(1) << 22;
// Flop-equivalents per entry: a token pair's compare and add; writing and reading M.
constexpr index_t kPairElementCost = 8;
constexpr index_t kRowElementCost = 6;
// Rows of a block of the upper triangle of a symmetric K, and the B from which it pays.
constexpr index_t kTriangleBlock = 64;
constexpr index_t kTriangleMinRows = 128;

// One batch of tokens: its indices and output gradients (accumulation dtype, contiguous).
template <typename S>
struct Batch {
  const int64_t* rows;
  const S* e;
  index_t B, T;
};

// The rank of each token's table row among the rows that occur in the batches (first
// occurrence order; padding: -1), and their count R.
std::tuple<std::vector<int32_t>, index_t> used_row_ranks(const int64_t* rows, index_t n,
                                                         int64_t N, int64_t pad) {
  std::vector<int32_t> rank(n);
  index_t R = 0;
  if (N <= 8 * n + (1 << 16)) {  // a lookup table of the rows
    std::vector<int32_t> of_row(N, -1);
    for (index_t k = 0; k < n; ++k) {
      const int64_t r = rows[k];
      if (r == pad) { rank[k] = -1; continue; }
      if (of_row[r] < 0) of_row[r] = static_cast<int32_t>(R++);
      rank[k] = of_row[r];
    }
    return {std::move(rank), R};
  }
  std::vector<int64_t> sorted(rows, rows + n);  // a huge table: the sorted distinct rows
  std::sort(sorted.begin(), sorted.end());
  sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
  for (index_t k = 0; k < n; ++k)
    rank[k] = static_cast<int32_t>(std::lower_bound(sorted.begin(), sorted.end(), rows[k]) -
                                   sorted.begin());
  const auto p = std::lower_bound(sorted.begin(), sorted.end(), pad);
  const bool has_pad = p != sorted.end() && *p == pad;
  const int32_t pr = static_cast<int32_t>(p - sorted.begin());
  if (has_pad)
    for (auto& r : rank) r = r == pr ? -1 : r > pr ? r - 1 : r;
  return {std::move(rank), static_cast<index_t>(sorted.size()) - has_pad};
}

// K[j, i] = K[i, j] for j > i (K square, contiguous).
template <typename S>
void mirror_upper(S* K, index_t B) {
  for (index_t i = 0; i < B; ++i)
    for (index_t j = i + 1; j < B; ++j) K[j * B + i] = K[i * B + j];
}

// Measured (1 thread, B = 128, T = 4, d = 64; B = 64, T = 8, d = 32, uniform indices): the
// used-rows time grows linearly in R and crosses the token-pair time at R ≈ 28 and ≈ 90; this
// model puts the crossings at R = 30 and 122 (one that counted only the triangle of P that a
// symmetric K needs put them at 16 and 65).
bool used_rows_cheaper(index_t B, index_t T, index_t B2, index_t T2, index_t d, index_t R,
                       bool cross) {
  const index_t pairs = cross ? B * T * B2 * T2 : B * T * (B * T + 1) / 2;
  const index_t row_pairs = cross ? B * B2 : B * (B + 1) / 2;
  // The GEMM forms the whole of P (both triangles for a symmetric K), the sums visit pairs.
  const index_t token_pair = B * T * B2 * T2 * 2 * d + pairs * kPairElementCost;
  const index_t used_rows = 2 * row_pairs * R * d + kRowElementCost * (B + (cross ? B2 : 0)) * R * d;
  return used_rows < token_pair || B * T * B2 * T2 > kPairBlock;
}

template <typename S>
void token_pairs(const Batch<S>& a, const Batch<S>& b, index_t d, int64_t pad, bool cross,
                 const at::Tensor& ea, const at::Tensor& eb, S* K) {
  const at::Tensor P = at::mm(ea.view({a.B * a.T, d}), eb.view({b.B * b.T, d}).t());
  const S* p = P.const_data_ptr<S>();
  const index_t ld = b.B * b.T;
  at::parallel_for(0, a.B, 1, [&](index_t lo, index_t hi) {
    for (index_t i = lo; i < hi; ++i)
      for (index_t j = cross ? 0 : i; j < b.B; ++j) {
        S s = 0;
        for (index_t t = 0; t < a.T; ++t) {
          const int64_t r = a.rows[i * a.T + t];
          if (r == pad) continue;
          const S* row = p + (i * a.T + t) * ld + j * b.T;
          for (index_t u = 0; u < b.T; ++u)
            if (b.rows[j * b.T + u] == r) s += row[u];
        }
        K[i * b.B + j] = s;
      }
  });
}

// M[i, (rank - lo)·d : +d] = Σ_t [rank_it = rank] e_it for the ranks in [lo, lo + width).
template <typename S>
void scatter_rows(const Batch<S>& a, const int32_t* rank, index_t lo, index_t width, index_t d,
                  S* M) {
  at::parallel_for(0, a.B, 1, [&](index_t s0, index_t s1) {
    for (index_t i = s0; i < s1; ++i) {
      S* m = M + i * width * d;
      std::fill(m, m + width * d, S(0));
      for (index_t t = 0; t < a.T; ++t) {
        const index_t r = rank[i * a.T + t] - lo;
        if (r < 0 || r >= width) continue;
        const S* x = a.e + (i * a.T + t) * d;
        S* o = m + r * d;
        for (index_t k = 0; k < d; ++k) o[k] += x[k];
      }
    }
  });
}

template <typename S>
void used_rows(const Batch<S>& a, const Batch<S>& b, const int32_t* rank, index_t R, index_t d,
               bool cross, at::Tensor& K) {
  const index_t samples = a.B + (cross ? b.B : 0);
  const index_t step = std::max<index_t>(1, kRowsBlock / std::max<index_t>(1, samples * d));
  const index_t width_max = std::min(step, R);
  at::Tensor M1 = at::empty({a.B, width_max * d}, K.options());
  at::Tensor M2 = cross ? at::empty({b.B, width_max * d}, K.options()) : M1;
  const index_t blocks = a.B >= kTriangleMinRows ? kTriangleBlock : std::max<index_t>(a.B, 1);
  for (index_t lo = 0; lo < R; lo += step) {
    const index_t width = std::min(step, R - lo);
    // M's first n·width·d entries as n rows of width·d (the last block is narrower).
    const auto block = [&](const at::Tensor& M, index_t n) {
      return M.view(-1).narrow(0, 0, n * width * d).view({n, width * d});
    };
    scatter_rows(a, rank, lo, width, d, M1.data_ptr<S>());
    const at::Tensor m1 = block(M1, a.B);
    if (cross) {
      scatter_rows(b, rank + a.B * a.T, lo, width, d, M2.data_ptr<S>());
      K.addmm_(m1, block(M2, b.B).t());
      continue;
    }
    for (index_t r0 = 0; r0 < a.B; r0 += blocks) {  // the upper triangle by row blocks
      const index_t r1 = std::min(r0 + blocks, a.B);
      K.narrow(0, r0, r1 - r0).narrow(1, r0, a.B - r0)
          .addmm_(m1.narrow(0, r0, r1 - r0), m1.narrow(0, r0, a.B - r0).t());
    }
  }
}

// K_ii = Σ_r g_i[r] · g2_i[r]: sample i's tokens of both batches sorted by row, each row's
// sums formed once.
template <typename S>
void gram_diagonal(const Batch<S>& a, const Batch<S>& b, index_t d, int64_t pad, bool cross,
                   S* K) {
  at::parallel_for(0, a.B, 1, [&](index_t lo, index_t hi) {
    std::vector<std::tuple<int64_t, int, index_t>> tokens;  // (row, batch, token)
    std::vector<S> s1(d), s2(d);
    for (index_t i = lo; i < hi; ++i) {
      tokens.clear();
      for (index_t t = 0; t < a.T; ++t)
        if (a.rows[i * a.T + t] != pad) tokens.emplace_back(a.rows[i * a.T + t], 0, i * a.T + t);
      if (cross)
        for (index_t t = 0; t < b.T; ++t)
          if (b.rows[i * b.T + t] != pad) tokens.emplace_back(b.rows[i * b.T + t], 1, i * b.T + t);
      std::sort(tokens.begin(), tokens.end());
      S k = 0;
      for (size_t g = 0; g < tokens.size();) {
        std::fill(s1.begin(), s1.end(), S(0));
        std::fill(s2.begin(), s2.end(), S(0));
        const int64_t row = std::get<0>(tokens[g]);
        for (; g < tokens.size() && std::get<0>(tokens[g]) == row; ++g) {
          const auto [r, which, tok] = tokens[g];
          const S* x = which ? b.e + tok * d : a.e + tok * d;
          S* s = which ? s2.data() : s1.data();
          for (index_t c = 0; c < d; ++c) s[c] += x[c];
        }
        k += emb::dot(s1.data(), cross ? s2.data() : s1.data(), d);
      }
      K[i] = k;
    }
  });
}

at::Tensor gram_embedding_cpu(const at::Tensor& idx, const at::Tensor& E, int64_t num_embeddings,
                              std::optional<int64_t> padding_idx,
                              const std::optional<at::Tensor>& idx2,
                              const std::optional<at::Tensor>& E2, bool diagonal) {
  constexpr const char* op = "gram_embedding";
  emb::check_idx_E(op, "idx", idx, "E", E);
  const int64_t pad = emb::checked_padding(op, num_embeddings, padding_idx);
  TORCH_CHECK_VALUE(idx2.has_value() == E2.has_value(), op,
                    ": idx2 and E2 must be given together (cross-Gram) or not at all");
  const bool cross = idx2.has_value();
  if (cross) {
    emb::check_idx_E(op, "idx2", *idx2, "E2", *E2);
    emb::check_same_device(op, "E", E, "E2", *E2);
    TORCH_CHECK_VALUE(E.scalar_type() == E2->scalar_type(), op,
                      ": E and E2 must have the same dtype, got E: ",
                      emb::py_dtype(E.scalar_type()), ", E2: ", emb::py_dtype(E2->scalar_type()));
    emb::check_dim_match(op, "E", E.size(2), "E2", E2->size(2), "embedding dim d");
    if (diagonal)
      emb::check_dim_match(op, "idx", idx.size(0), "idx2", idx2->size(0),
                           "batch size B (diagonal of a cross-Gram)");
  }
  const index_t B = idx.size(0), T = idx.size(1), d = E.size(2);
  const index_t B2 = cross ? idx2->size(0) : B, T2 = cross ? idx2->size(1) : T;
  // The indices of both batches in one array (the ranks of their rows agree).
  const at::Tensor rows = cross ? at::cat({idx.reshape(-1), idx2->reshape(-1)})
                                 : idx.contiguous().view(-1);
  const int64_t* r = rows.const_data_ptr<int64_t>();
  emb::check_index_range(op, "idx", r, B * T, num_embeddings);
  if (cross) emb::check_index_range(op, "idx2", r + B * T, B2 * T2, num_embeddings);
  const auto acc = emb::acc_type(E);
  const at::Tensor e1 = E.to(acc).contiguous();
  const at::Tensor e2 = cross ? E2->to(acc).contiguous() : e1;
  at::Tensor K = at::zeros(diagonal ? at::IntArrayRef{B} : at::IntArrayRef{B, B2},
                           E.options().dtype(acc));
  if (B * T == 0 || B2 * T2 == 0 || d == 0) return K;
  AT_DISPATCH_FLOATING_TYPES(acc, op, [&] {
    using S = scalar_t;
    const Batch<S> a{r, e1.const_data_ptr<S>(), B, T};
    const Batch<S> b{cross ? r + B * T : r, e2.const_data_ptr<S>(), B2, T2};
    if (diagonal) return gram_diagonal(a, b, d, pad, cross, K.data_ptr<S>());
    const auto [rank, R] = used_row_ranks(r, rows.numel(), num_embeddings, pad);
    if (used_rows_cheaper(B, T, B2, T2, d, R, cross))
      used_rows(a, b, rank.data(), R, d, cross, K);
    else
      token_pairs(a, b, d, pad, cross, e1, e2, K.data_ptr<S>());
    if (!cross) mirror_upper(K.data_ptr<S>(), B);
  });
  return K;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_kernels, CPU, m) { m.impl("gram_embedding", &gram_embedding_cpu); }

}  // namespace lowrank
