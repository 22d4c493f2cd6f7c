// The token-level cores of the weighted sums and projections of a layer's per-sample gradients
// g_i = Σ_t e_it a_itᵀ (a linear layer over tokens; a Conv2d through its im2col tokens), shared
// by csrc/{weighted_sum,project}_{linear,conv2d}.cpp:
//
//   weighted sum  W_j = Σ_i c_ij g_i            (m coefficient columns at once)
//   projection    P_ij = ⟨g_i, V_j⟩ = Σ_t e_itᵀ V_j a_it   (m directions at once)
//
// each by the cheaper of two exact routes, per group of the layer:
// - scaled / GEMM + dot: one GEMM over all (i, t) rows for all m columns — W = (C ⊙ E)ᵀ A,
//   resp. Y = A Vᵀ (or E V) then row dots with E (or A): 2·B·T·m·d_in·d_out flops (the
//   weighted sum's for B·T ≤ 64 float32 rows: lowrank/scaled_rows_gemm.h, scaling fused);
// - per sample: G_i = E_iᵀ A_i by one bmm (blocks of d_out rows), then W = Cᵀ G resp. P = G Vᵀ:
//   2·B·T·d_in·d_out + 2·B·m·d_in·d_out flops — cheaper when T > 1 and m > 1.
// Tokens come as (B, T, groups·width) views of any strides; the results are float32 (float64
// for float64 layer tensors), accumulated in that dtype.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "lowrank/f32_tiles.h"
#include "lowrank/scaled_rows_gemm.h"

namespace lowrank::combine {

enum class Route { kAuto, kScaled, kPerSample };

inline Route parse_route(const char* op, c10::string_view route) {
  if (route == "auto") return Route::kAuto;
  if (route == "scaled") return Route::kScaled;
  if (route == "per_sample") return Route::kPerSample;
  TORCH_CHECK_VALUE(false, op, ": route must be 'auto', 'scaled' or 'per_sample', got '",
                    std::string(route), "'");
}

// Flop-equivalents of writing and reading one per-sample gradient entry, and of one scaled
// operand entry (fitted on a 2-core AVX2 EPYC, one thread; see choose_route).
constexpr int64_t kGradElementCost = 6;
constexpr int64_t kScaleElementCost = 4;

// The cheaper route for one group of these sizes (B samples, T tokens, k = d_in, d = d_out,
// m columns / directions).
inline Route choose_route(int64_t B, int64_t T, int64_t k, int64_t d, int64_t m) {
  const double rows = static_cast<double>(B) * T, P = static_cast<double>(k) * d;
  const double scaled = 2 * rows * m * P + kScaleElementCost * rows * m * std::min(k, d);
  const double per_sample = 2 * rows * P + 2.0 * B * m * P + kGradElementCost * B * P;
  return scaled <= per_sample ? Route::kScaled : Route::kPerSample;
}

// The accumulation dtype of layer tensors of dtype t: float64 for float64, else float32.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Entries of a block of per-sample gradients (samples × parameters) held at once.
constexpr int64_t kGradBlock = int64_t{1} << 22;
// Entries of a block of the GEMM + dot route's Y (rows × m·width) held at once.
constexpr int64_t kRowBlock = int64_t{1} << 22;

// Rows of d_out per block of per-sample gradients G (B, rows, k).
inline int64_t grad_block_rows(int64_t B, int64_t k, int64_t d) {
  return std::min(d, std::max<int64_t>(1, kGradBlock / std::max<int64_t>(1, B * k)));
}

// X.narrow(dim, start, length), X itself when that is all of it (a narrow is a dispatcher call,
// 1-3 us: several per call showed in the small rows).
inline at::Tensor part(const at::Tensor& X, int64_t dim, int64_t start, int64_t length) {
  return start == 0 && length == X.size(dim) ? X : X.narrow(dim, start, length);
}

// out = src, writing straight into out where it is a view of the right shape.
inline void assign(at::Tensor out, const at::Tensor& src) {
  if (!out.is_same(src)) out.copy_(src);
}

// ---- float32 loops under a runtime-dispatched AVX2 + FMA target (the baseline ISA has no
// FMA; the package is built for it). Sums run in index order per lane: exact as any GEMM.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define LK_COMBINE_AVX2 1
#define LK_COMBINE_TARGET __attribute__((target("avx2,fma")))

inline bool has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

LK_COMBINE_TARGET inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// W[j, p] = Σ_i C[i, j] G[i, p] for p < n: G rows of stride ldg, C (B, m) contiguous, W rows
// of stride ldw.
LK_COMBINE_TARGET inline void combine_rows(const float* G, int64_t ldg, int64_t B, int64_t n,
                                           const float* C, int64_t m, float* W, int64_t ldw) {
  int64_t p = 0;
  for (; p + 32 <= n; p += 32)
    for (int64_t j = 0; j < m; ++j) {
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t i = 0; i < B; ++i) {
        const __m256 c = _mm256_set1_ps(C[i * m + j]);
        const float* g = G + i * ldg + p;
        a0 = _mm256_fmadd_ps(c, _mm256_loadu_ps(g), a0);
        a1 = _mm256_fmadd_ps(c, _mm256_loadu_ps(g + 8), a1);
        a2 = _mm256_fmadd_ps(c, _mm256_loadu_ps(g + 16), a2);
        a3 = _mm256_fmadd_ps(c, _mm256_loadu_ps(g + 24), a3);
      }
      float* w = W + j * ldw + p;
      _mm256_storeu_ps(w, a0);
      _mm256_storeu_ps(w + 8, a1);
      _mm256_storeu_ps(w + 16, a2);
      _mm256_storeu_ps(w + 24, a3);
    }
  for (; p < n; ++p)
    for (int64_t j = 0; j < m; ++j) {
      float acc = 0;
      for (int64_t i = 0; i < B; ++i) acc = std::fma(C[i * m + j], G[i * ldg + p], acc);
      W[j * ldw + p] = acc;
    }
}

// out[j] += Σ_p g[p] V[j0 + j, p] for j < J: V rows of stride ldv.
template <int J>
LK_COMBINE_TARGET inline void dots(const float* g, const float* V, int64_t ldv, int64_t n,
                                   float* out, int64_t so) {
  __m256 a[J][2];
  for (int j = 0; j < J; ++j) a[j][0] = a[j][1] = _mm256_setzero_ps();
  int64_t p = 0;
  for (; p + 16 <= n; p += 16) {
    const __m256 g0 = _mm256_loadu_ps(g + p), g1 = _mm256_loadu_ps(g + p + 8);
    for (int j = 0; j < J; ++j) {
      a[j][0] = _mm256_fmadd_ps(g0, _mm256_loadu_ps(V + j * ldv + p), a[j][0]);
      a[j][1] = _mm256_fmadd_ps(g1, _mm256_loadu_ps(V + j * ldv + p + 8), a[j][1]);
    }
  }
  for (int j = 0; j < J; ++j) {
    float acc = hsum(_mm256_add_ps(a[j][0], a[j][1]));
    for (int64_t q = p; q < n; ++q) acc = std::fma(g[q], V[j * ldv + q], acc);
    out[j * so] += acc;
  }
}

// out[i, j] += Σ_p G[i, p] V[j, p] (i < B, j < m, p < n): G rows of stride ldg, V rows of
// stride ldv, out (B, m) of strides (so0, so1). In chunks of p, so that each chunk of G and V
// is read from L1 (from memory once), not each row of V once per row of G.
LK_COMBINE_TARGET inline void add_row_dots(const float* G, int64_t ldg, int64_t B,
                                           const float* V, int64_t ldv, int64_t m, int64_t n,
                                           float* out, int64_t so0, int64_t so1) {
  constexpr int64_t kChunk = 1024;
  for (int64_t p0 = 0; p0 < n; p0 += kChunk) {
    const int64_t len = std::min(kChunk, n - p0);
    for (int64_t i = 0; i < B; ++i) {
      const float* g = G + i * ldg + p0;
      const float* v = V + p0;
      float* o = out + i * so0;
      int64_t j = 0;
      for (; j + 4 <= m; j += 4) dots<4>(g, v + j * ldv, ldv, len, o + j * so1, so1);
      switch (m - j) {
        case 3: dots<3>(g, v + j * ldv, ldv, len, o + j * so1, so1); break;
        case 2: dots<2>(g, v + j * ldv, ldv, len, o + j * so1, so1); break;
        case 1: dots<1>(g, v + j * ldv, ldv, len, o + j * so1, so1); break;
        default: break;
      }
    }
  }
}

#endif

// Whether the float32 AVX2 loops take tensors of t's dtype here.
inline bool simd_float(const at::Tensor& t) {
#ifdef LK_COMBINE_AVX2
  return t.scalar_type() == at::kFloat && has_avx2_fma();
#else
  (void)t;
  return false;
#endif
}

// Gb (B, h, k) = (E_i[:, lo:lo + h]ᵀ A_i)_i: float32 by tiles::xt_y in place (unit last
// strides), else one bmm. Gb: rows of k contiguous.
inline void per_sample_grads(const at::Tensor& E, const at::Tensor& A, int64_t lo, int64_t h,
                             at::Tensor& Gb) {
  if (simd_float(A) && A.stride(2) == 1 && E.stride(2) == 1) {
    tiles::per_sample_grads(E.const_data_ptr<float>(), E.stride(0), E.stride(1),
                            A.const_data_ptr<float>(), A.stride(0), A.stride(1), A.size(0),
                            A.size(1), lo, h, A.size(2), Gb.data_ptr<float>(), Gb.stride(0),
                            Gb.stride(1));
    return;
  }
  at::bmm_out(Gb, E.narrow(2, lo, h).transpose(1, 2), A);
}

// W (m, d, k) = Σ_i c_ij E_iᵀ A_i for one group: A (B, T, k), E (B, T, d), C (B, m); W may be a
// strided view (a group's rows of the whole weight). B·T > 0.
inline void weighted_sum_group(const at::Tensor& A, const at::Tensor& E, const at::Tensor& C,
                               at::Tensor W, Route route) {
  const int64_t B = A.size(0), T = A.size(1), k = A.size(2), d = E.size(2), m = C.size(1);
  if (route == Route::kPerSample) {
    const int64_t step = grad_block_rows(B, k, d);
    at::Tensor G = at::empty({B, step, k}, A.options());
    const at::Tensor Cc = C.contiguous();
    const bool fast = simd_float(A) && W.stride(2) == 1 && W.stride(1) == k;
    for (int64_t lo = 0; lo < d; lo += step) {
      const int64_t h = std::min(step, d - lo);
      at::Tensor Gb = h == step ? G : G.narrow(1, 0, h);
      per_sample_grads(E, A, lo, h, Gb);
      at::Tensor Wb = part(W, 1, lo, h);  // (m, h, k): rows of k contiguous
#ifdef LK_COMBINE_AVX2
      if (fast) {
        combine_rows(Gb.const_data_ptr<float>(), Gb.stride(0), B, h * k,
                     Cc.const_data_ptr<float>(), m, Wb.data_ptr<float>(), Wb.stride(0));
        continue;
      }
#endif
      if (Wb.stride(2) == 1 && Wb.stride(1) == k) {
        at::Tensor W2 = Wb.view({m, h * k});
        at::mm_out(W2, C.t(), Gb.view({B, h * k}));
      } else {
        Wb.copy_(at::mm(C.t(), Gb.view({B, h * k})).view({m, h, k}));
      }
    }
    return;
  }
  const int64_t rows = B * T;
#ifdef LK_TILES_AVX2
  if (simd_float(A) && rows <= tiles::kScaledRowsMax && W.is_contiguous()) {  // scaling fused
    const at::Tensor A2 = A.reshape({rows, k}), E2 = E.reshape({rows, d}), Cc = C.contiguous();
    if (A2.stride(1) == 1 && E2.stride(1) == 1) {
      tiles::scaled_rows_gemm(A2.const_data_ptr<float>(), A2.stride(0),
                              E2.const_data_ptr<float>(), E2.stride(0),
                              Cc.const_data_ptr<float>(), m, T, rows, d, k, W.data_ptr<float>());
      return;
    }
  }
#endif
  const at::Tensor Cb = C.view({B, 1, m, 1});  // c_ij over (i, t, j, ·)
  if (d <= k) {  // scale E: (B T) × (m d), then (C ⊙ E)ᵀ A
    at::Tensor Es = at::empty({B, T, m, d}, E.options());
    at::mul_out(Es, E.unsqueeze(2), Cb);
    Es = Es.view({rows, m * d});
    const at::Tensor A2 = A.reshape({rows, k});
    if (W.is_contiguous()) {
      at::Tensor W2 = W.view({m * d, k});
      at::mm_out(W2, Es.t(), A2);
    } else {
      W.copy_(at::mm(Es.t(), A2).view({m, d, k}));
    }
  } else {  // scale A: Eᵀ (A ⊙ C) is (d, m, k)
    at::Tensor As = at::empty({B, T, m, k}, A.options());
    at::mul_out(As, A.unsqueeze(2), Cb);
    As = As.view({rows, m * k});
    W.copy_(at::mm(E.reshape({rows, d}).t(), As).view({d, m, k}).transpose(0, 1));
  }
}

// out[i, j] += Σ_{t, o} Y[i T + t - row0, j, o] · D[i, t, o] for the samples i of rows
// [row0, row0 + Y.size(0)) (whole samples): Y (rows, m, w) contiguous, D (B, T, w) strided.
template <typename scalar_t>
void add_token_dots(const at::Tensor& Y, const at::Tensor& D, at::Tensor& out, int64_t row0) {
  const int64_t T = D.size(1), w = D.size(2), m = Y.size(1);
  const int64_t sB = D.stride(0), sT = D.stride(1), sW = D.stride(2);
  const int64_t i0 = row0 / T, i1 = (row0 + Y.size(0)) / T;
  const scalar_t* y = Y.const_data_ptr<scalar_t>();
  const scalar_t* dp = D.const_data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t so = out.stride(0), sj = out.stride(1);
  at::parallel_for(i0, i1, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, T * m * w)),
                   [&](int64_t lo, int64_t hi) {
#ifdef LK_COMBINE_AVX2
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (sW == 1 && has_avx2_fma()) {
        for (int64_t i = lo; i < hi; ++i)
          for (int64_t t = 0; t < T; ++t)  // out[i, :] += Y[row] (m, w) · d_it
            add_row_dots(dp + i * sB + t * sT, 0, 1, y + (i * T + t - row0) * m * w, w, m, w,
                         o + i * so, 0, sj);
        return;
      }
    }
#endif
    constexpr int kLanes = 8;  // independent partial sums: vectorizable without reassociation
    for (int64_t i = lo; i < hi; ++i)
      for (int64_t j = 0; j < m; ++j) {
        scalar_t acc[kLanes] = {};
        scalar_t tail = 0;
        for (int64_t t = 0; t < T; ++t) {
          const scalar_t* yr = y + ((i * T + t - row0) * m + j) * w;
          const scalar_t* dr = dp + i * sB + t * sT;
          int64_t q = 0;
          if (sW == 1)
            for (; q + kLanes <= w; q += kLanes)
              for (int l = 0; l < kLanes; ++l) acc[l] += yr[q + l] * dr[q + l];
          for (; q < w; ++q) tail += yr[q] * dr[q * sW];
        }
        for (int l = 0; l < kLanes; ++l) tail += acc[l];
        o[i * so + j * sj] += tail;
      }
  });
}

// out (B, m) += (⟨g_i, V_j⟩) for one group: A (B, T, k), E (B, T, d), V (m, d, k). B·T > 0.
inline void project_group(const at::Tensor& A, const at::Tensor& E, const at::Tensor& V,
                          at::Tensor& out, Route route) {
  const int64_t B = A.size(0), T = A.size(1), k = A.size(2), d = E.size(2), m = V.size(0);
  if (route == Route::kPerSample) {
    const int64_t step = grad_block_rows(B, k, d);
    at::Tensor G = at::empty({B, step, k}, A.options());
    const bool fast = simd_float(A);
    for (int64_t lo = 0; lo < d; lo += step) {
      const int64_t h = std::min(step, d - lo);
      at::Tensor Gb = h == step ? G : G.narrow(1, 0, h);
      per_sample_grads(E, A, lo, h, Gb);
      const at::Tensor Vb = part(V, 1, lo, h).reshape({m, h * k});
#ifdef LK_COMBINE_AVX2
      if (fast && Vb.stride(1) == 1) {
        add_row_dots(Gb.const_data_ptr<float>(), Gb.stride(0), B, Vb.const_data_ptr<float>(),
                     Vb.stride(0), m, h * k, out.data_ptr<float>(), out.stride(0),
                     out.stride(1));
        continue;
      }
#endif
      out.addmm_(Gb.view({B, h * k}), Vb.t());
    }
    return;
  }
  // GEMM + dot: Y = A Vᵀ (rows, m, d) dotted with E, or Z = E V (rows, m, k) dotted with A.
  const bool by_A = d <= k;
  const at::Tensor X = by_A ? A.reshape({B * T, k}) : E.reshape({B * T, d});
  const at::Tensor Vop = by_A ? V.reshape({m * d, k}).t() : V.transpose(0, 1).reshape({d, m * k});
  const at::Tensor& D = by_A ? E : A;
  const int64_t w = by_A ? d : k;
  const int64_t samples = std::max<int64_t>(1, kRowBlock / std::max<int64_t>(1, T * m * w));
  for (int64_t i0 = 0; i0 < B; i0 += samples) {
    const int64_t n = std::min(samples, B - i0);
    const at::Tensor Y = at::mm(part(X, 0, i0 * T, n * T), Vop);  // (n T, m w)
    AT_DISPATCH_FLOATING_TYPES(Y.scalar_type(), "project_group", [&] {
      add_token_dots<scalar_t>(Y.view({n * T, m, w}), D, out, i0 * T);
    });
  }
}

// (W, bias part or None) of the weighted sum for token views A (B, T, G k), E (B, T, G d) in
// the accumulation dtype, C (B, m): W (m, G d, k), b (m, G d).
inline std::tuple<at::Tensor, std::optional<at::Tensor>> weighted_sum_tokens(
    const at::Tensor& A, const at::Tensor& E, const at::Tensor& C, bool bias, int64_t groups,
    Route route) {
  const int64_t B = A.size(0), T = A.size(1), k = A.size(2) / groups, d = E.size(2) / groups;
  const int64_t m = C.size(1);
  at::Tensor W = at::empty({m, groups * d, k}, A.options());
  if (B * T == 0) {
    W.zero_();
  } else if (W.numel() > 0) {
    if (route == Route::kAuto) route = choose_route(B, T, k, d, m);
    for (int64_t g = 0; g < groups; ++g)
      weighted_sum_group(part(A, 2, g * k, k), part(E, 2, g * d, d), C, part(W, 1, g * d, d),
                         route);
  }
  std::optional<at::Tensor> b;
  if (bias) b = at::mm(C.t(), E.sum(1));  // (m, G d)
  return {W, b};
}

// P (B, m) = (⟨g_i, V_j⟩ + Σ_t e_it·v_bj) for token views A (B, T, G k), E (B, T, G d) and
// V (m, G d, k), V_bias (m, G d), all in the accumulation dtype.
inline at::Tensor project_tokens(const at::Tensor& A, const at::Tensor& E, const at::Tensor& V,
                                 const std::optional<at::Tensor>& V_bias, int64_t groups,
                                 Route route) {
  const int64_t B = A.size(0), T = A.size(1), k = A.size(2) / groups, d = E.size(2) / groups;
  const int64_t m = V.size(0);
  at::Tensor out = at::zeros({B, m}, A.options());
  if (B * T > 0 && k * d > 0 && m > 0) {
    if (route == Route::kAuto) route = choose_route(B, T, k, d, m);
    for (int64_t g = 0; g < groups; ++g)
      project_group(part(A, 2, g * k, k), part(E, 2, g * d, d), part(V, 1, g * d, d), out,
                    route);
  }
  if (V_bias.has_value()) out.addmm_(E.sum(1), V_bias->t());
  return out;
}

}  // namespace lowrank::combine
