// lowrank_kernels::gram_linear's CPU kernel, registered on the public schema (declared in
// lowrank_kernels/ops/gram_linear.py), and the token core it shares with gram_conv2d
// (lowrank/gram_tokens.h):
//
//   K_ij = Σ_g Σ_{t,s} (a_it·a2_js + b)(e_it·e2_js) = ⟨g_i, h_j⟩,   g_i = Σ_t e_it [a_it, 1]ᵀ,
//
// by one of two exact routes, BLAS GEMMs (at::mm / at::bmm) for the products and plain loops
// for what is left:
// - token pair: X = (A A2ᵀ + b) ⊙ (E E2ᵀ) over token rows, its T × T blocks summed per sample
//   pair in one fused pass (no product temporary); for the symmetric K only one triangle, then
//   mirrored: at T = 1 in float32 A Aᵀ and E Eᵀ by register tiles on and below the diagonal
//   (lowrank/f32_tiles.h syrk_lower, about half the flops of a GEMM) and one pass
//   (SA + b) ⊙ SE; else the upper block rows of GEMMs (B ≥ 128: rows of 32 or 64, 9/16 to 5/8
//   of the flops of the full GEMMs). diagonal=True at T = 1 is row dots (‖a_i‖² + b)‖e_i‖² in
//   one pass over A and E (float32: FMA chains, one load per element of the Gram's own);
// - per sample: G_i = E_iᵀ A_i (float32: register tiles reading E_i and A_i in place, else one
//   bmm; in blocks of d_out bounded by kGradBlock entries), then K = G G2ᵀ (+ S S2ᵀ,
//   S_i = Σ_t e_it, with a bias; the symmetric float32 K by syrk_lower) — the diagonal as row
//   dots of G.
// route "auto" picks by choose_route, a flop model whose element costs were fitted on a 2-core
// AVX2 EPYC (torch 2.13, MKL, 1 thread), see there.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <type_traits>

#include "lowrank/f32_tiles.h"
#include "lowrank/gram_tokens.h"
#include "lowrank/layer_checks.h"
#include "lowrank/target_clones.h"

namespace lowrank::gram {
namespace {

constexpr const char* kOp = "gram_linear";
// Entries of a block of token-pair products (rows × columns of X) held at once.
constexpr int64_t kPairBlock = 1 << 20;
// Entries of a block of per-sample gradients (samples × parameters) held at once.
constexpr int64_t kGradBlock = 1 << 22;
// Symmetric T = 1 Gram: from kTriangleMinRows samples on, upper block rows of kTriangleBlock
// (measured, 1 thread, A A1ᵀ with d = 512..1024: full GEMM 52 / 287 / 1502 us at B = 64 / 128 /
// 256 against rows of 32: 60 / 241 / 1209 us and rows of 64: 59 / 253 / 1104 us).
constexpr int64_t kTriangleMinRows = 128;
int64_t triangle_block(int64_t B) { return B < kTriangleMinRows ? B : B < 256 ? 32 : 64; }
// Flop-equivalents of one fused pass over an entry of X (+b, ⊙, the sum) and of writing and
// reading one per-sample gradient entry.
constexpr int64_t kPairElementCost = 12;
constexpr int64_t kGradElementCost = 6;

// Row dots (embedding::dot with 32 partial sums), compiled for AVX2 too (LOWRANK_CLONES).
LOWRANK_CLONES float fast_dot(const float* a, const float* b, int64_t n) {
  return embedding::dot<32>(a, b, n);
}
LOWRANK_CLONES double fast_dot(const double* a, const double* b, int64_t n) {
  return embedding::dot<32>(a, b, n);
}

at::ScalarType acc_type(const at::Tensor& A) {
  return A.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// K's strict lower triangle := its upper one transposed (from_lower: the other way round):
// exactly symmetric. By 16 × 16 blocks (by 64 × 64 ones, the 64 rows of a block's column,
// 1 KiB apart at n = 256, thrashed L1's sets).
template <typename S>
void mirror(at::Tensor& K, bool from_lower) {
  const int64_t n = K.size(0);
  S* k = K.data_ptr<S>();
  constexpr int64_t kTile = 16;
  for (int64_t i0 = 0; i0 < n; i0 += kTile)
    for (int64_t j0 = i0; j0 < n; j0 += kTile)
      for (int64_t i = i0; i < std::min(i0 + kTile, n); ++i)
        for (int64_t j = std::max(j0, i + 1); j < std::min(j0 + kTile, n); ++j) {
          if (from_lower) k[i * n + j] = k[j * n + i];
          else k[j * n + i] = k[i * n + j];
        }
}

// The last dim with unit stride (row dots and the fused passes read rows).
at::Tensor unit_rows(const at::Tensor& X) {
  return X.size(-1) <= 1 || X.stride(-1) == 1 ? X : X.contiguous();
}

// X.narrow(dim, start, length), X itself when that is all of it (a narrow is a dispatcher
// call, ~1 us: several per call showed at B = 4).
at::Tensor part(const at::Tensor& X, int64_t dim, int64_t start, int64_t length) {
  return start == 0 && length == X.size(dim) ? X : X.narrow(dim, start, length);
}

// One group's columns of a token tensor (B, T, G·k).
at::Tensor group(const at::Tensor& X, int64_t g, int64_t k) { return part(X, 2, g * k, k); }

// out[i] (+)= Σ_g (a_ig·a2_ig + b)(e_ig·e2_ig) for T = 1 token tensors (B, 1, G·k).
template <typename S>
void diagonal_rows(const at::Tensor& A, const at::Tensor& E, const at::Tensor& A2,
                   const at::Tensor& E2, S b, int64_t groups, at::Tensor& out) {
  const int64_t B = A.size(0), ka = A.size(2) / groups, ke = E.size(2) / groups;
  const S *a = A.const_data_ptr<S>(), *e = E.const_data_ptr<S>();
  const S *a2 = A2.const_data_ptr<S>(), *e2 = E2.const_data_ptr<S>();
  const int64_t sa = A.stride(0), se = E.stride(0), sa2 = A2.stride(0), se2 = E2.stride(0);
  S* o = out.data_ptr<S>();
#ifdef LK_TILES_AVX2
  if constexpr (std::is_same_v<S, float>) {
    if (tiles::has_avx2_fma()) {  // FMA chains; the Gram's own diagonal: one load per element
      const bool square = a == a2 && sa == sa2 && e == e2 && se == se2;
      at::parallel_for(0, B, 16, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) {
          float sum = 0;
          for (int64_t g = 0; g < groups; ++g) {
            const float *ai = a + i * sa + g * ka, *ei = e + i * se + g * ke;
            sum += square ? (tiles::row_dot<true>(ai, ai, ka) + b) * tiles::row_dot<true>(ei, ei, ke)
                          : (tiles::row_dot<false>(ai, a2 + i * sa2 + g * ka, ka) + b) *
                                tiles::row_dot<false>(ei, e2 + i * se2 + g * ke, ke);
          }
          o[i] = sum;
        }
      });
      return;
    }
  }
#endif
  at::parallel_for(0, B, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      S sum = 0;
      for (int64_t g = 0; g < groups; ++g)
        sum += (fast_dot(a + i * sa + g * ka, a2 + i * sa2 + g * ka, ka) + b) *
               fast_dot(e + i * se + g * ke, e2 + i * se2 + g * ke, ke);
      o[i] = sum;
    }
  });
}

// K[r0 + i, c0 + j] (+)= Σ_{t,s} (xa + b)(xe) over the T × T block (i, j) of X's block
// (upper: only entries on and above K's diagonal are needed).
template <typename S>
void pair_block_sums(const at::Tensor& xa, const at::Tensor& xe, S b, int64_t T, int64_t r0,
                     int64_t c0, bool accumulate, bool upper, at::Tensor& K) {
  const int64_t nr = xa.size(0) / std::max<int64_t>(T, 1), nc = xa.size(1) / std::max<int64_t>(T, 1);
  const int64_t ld = xa.size(1), ldk = K.size(1);
  const S *pa = xa.const_data_ptr<S>(), *pe = xe.const_data_ptr<S>();
  S* k = K.data_ptr<S>();
  if (T == 1) {  // one product per entry (vectorized); symmetric: on and above the diagonal
    at::parallel_for(0, nr, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        S* row = k + (r0 + i) * ldk + c0;
        const S *ra = pa + i * ld, *re = pe + i * ld;
        for (int64_t j = upper ? r0 + i - c0 : 0; j < nc; ++j)
          row[j] = accumulate ? row[j] + (ra[j] + b) * re[j] : (ra[j] + b) * re[j];
      }
    });
    return;
  }
  at::parallel_for(0, nr, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      S* row = k + (r0 + i) * ldk + c0;
      for (int64_t j = 0; j < nc; ++j) {
        S sum = 0;
        for (int64_t t = 0; t < T; ++t) {
          const S* ra = pa + (i * T + t) * ld + j * T;
          const S* re = pe + (i * T + t) * ld + j * T;
          for (int64_t s = 0; s < T; ++s) sum += (ra[s] + b) * re[s];
        }
        row[j] = accumulate ? row[j] + sum : sum;
      }
    }
  });
}

// Whether the float32 register tiles (lowrank/f32_tiles.h) take these tensors here.
bool f32_tiles(const at::Tensor& X) {
  return X.scalar_type() == at::kFloat && tiles::has_avx2_fma();
}

// The symmetric T = 1 Gram in float32, K = Σ_g (A_g A_gᵀ + b) ⊙ (E_g E_gᵀ): per group the two
// products on and below the diagonal by tiles::syrk_lower (about half a GEMM's flops each),
// then one pass K (+)= (SA + b) ⊙ SE over the lower triangle (one group: in place of SA) that
// also writes the upper one (tiles::hadamard_lower). A (B, 1, G·ka), E (B, 1, G·ke) with unit
// last strides.
at::Tensor symmetric_rows(const at::Tensor& A, const at::Tensor& E, float b, int64_t groups) {
  const int64_t n = A.size(0), ka = A.size(2) / groups, ke = E.size(2) / groups;
  at::Tensor K = at::empty({n, n}, A.options()), SE = at::empty({n, n}, A.options());
  const at::Tensor SA = groups > 1 ? at::empty({n, n}, A.options()) : K;
  float *k = K.data_ptr<float>(), *sa = SA.data_ptr<float>(), *se = SE.data_ptr<float>();
  for (int64_t g = 0; g < groups; ++g) {
    tiles::syrk_lower(A.const_data_ptr<float>() + g * ka, A.stride(0), n, ka, sa, n, false);
    tiles::syrk_lower(E.const_data_ptr<float>() + g * ke, E.stride(0), n, ke, se, n, false);
    tiles::hadamard_lower(sa, se, b, n, k, g > 0, g + 1 == groups);
  }
  return K;
}

// The token-pair route; A... (B, T, G·k) in the accumulation dtype.
template <typename S>
at::Tensor token_pair(const at::Tensor& A, const at::Tensor& E, const at::Tensor& A2,
                      const at::Tensor& E2, S b, bool cross, bool diagonal, int64_t groups) {
  const int64_t B1 = A.size(0), B2 = A2.size(0), T = A.size(1);
  const int64_t ka = A.size(2) / groups, ke = E.size(2) / groups;
  if (diagonal) {
    at::Tensor out = at::empty({B1}, A.options());
    if (T == 1) {
      diagonal_rows<S>(unit_rows(A), unit_rows(E), unit_rows(A2), unit_rows(E2), b, groups, out);
      return out;
    }
    out.zero_();
    const int64_t step = std::max<int64_t>(1, kPairBlock / std::max<int64_t>(1, T * T));
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t lo = 0; lo < B1; lo += step) {
        const int64_t n = std::min(step, B1 - lo);
        auto pair_dots = [&](const at::Tensor& X, const at::Tensor& Y, int64_t k) {
          return at::bmm(part(group(X, g, k), 0, lo, n),
                         part(group(Y, g, k), 0, lo, n).transpose(1, 2));
        };
        const at::Tensor xa = pair_dots(A, A2, ka), xe = pair_dots(E, E2, ke);
        const S *pa = xa.const_data_ptr<S>(), *pe = xe.const_data_ptr<S>();
        S* o = out.data_ptr<S>() + lo;
        at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            S sum = 0;
            for (int64_t q = i * T * T; q < (i + 1) * T * T; ++q) sum += (pa[q] + b) * pe[q];
            o[i] += sum;
          }
        });
      }
    return out;
  }
  if (B1 == 0 || B2 == 0 || T == 0) return at::zeros({B1, B2}, A.options());
  if constexpr (std::is_same_v<S, float>)
    if (T == 1 && !cross && f32_tiles(A)) return symmetric_rows(unit_rows(A), unit_rows(E), b, groups);
  at::Tensor K = at::empty({B1, B2}, A.options());
  const int64_t fits = std::max<int64_t>(1, kPairBlock / std::max<int64_t>(1, T * T * B2));
  const int64_t step = cross ? fits : std::min(fits, T == 1 ? triangle_block(B1) : B1);
  for (int64_t g = 0; g < groups; ++g) {
    const at::Tensor Af = group(A, g, ka).reshape({B1 * T, ka});
    const at::Tensor Ef = group(E, g, ke).reshape({B1 * T, ke});
    const at::Tensor A2f = cross ? group(A2, g, ka).reshape({B2 * T, ka}) : Af;
    const at::Tensor E2f = cross ? group(E2, g, ke).reshape({B2 * T, ke}) : Ef;
    for (int64_t r0 = 0; r0 < B1; r0 += step) {
      const int64_t nr = std::min(step, B1 - r0), c0 = cross ? 0 : r0;
      const at::Tensor xa = at::mm(part(Af, 0, r0 * T, nr * T),
                                   part(A2f, 0, c0 * T, (B2 - c0) * T).t());
      const at::Tensor xe = at::mm(part(Ef, 0, r0 * T, nr * T),
                                   part(E2f, 0, c0 * T, (B2 - c0) * T).t());
      pair_block_sums<S>(xa, xe, b, T, r0, c0, g > 0, !cross, K);
    }
  }
  if (!cross) mirror<S>(K, false);
  return K;
}

// The per-sample route: per group, blocks of d_out rows of G_i = E_iᵀ A_i, then K += G G2ᵀ
// (the first product written by at::mm / mm_out, no zero fill: at B = 4 the call is the
// baseline's bmm + GEMM and little else).
template <typename S>
at::Tensor per_sample(const at::Tensor& A, const at::Tensor& E, const at::Tensor& A2,
                      const at::Tensor& E2, bool bias, bool cross, bool diagonal,
                      int64_t groups) {
  const int64_t B1 = A.size(0), B2 = A2.size(0);
  const int64_t ka = A.size(2) / groups, ke = E.size(2) / groups;
  if (B1 == 0 || B2 == 0)
    return diagonal ? at::zeros({B1}, A.options()) : at::zeros({B1, B2}, A.options());
  const int64_t step = std::max<int64_t>(1, kGradBlock / std::max<int64_t>(1, (B1 + B2) * ka));
  const bool tiled = f32_tiles(A) && std::is_same_v<S, float>;
  // The symmetric K: float32 lower tiles (tiles::syrk_lower; at B = 4, P = 12288: 11 us against
  // MKL's 16 us for the full G Gᵀ), else upper block rows of GEMMs from kTriangleMinRows on,
  // else one GEMM.
  const bool syrk = tiled && !cross && !diagonal;
  const bool triangle = !syrk && !cross && !diagonal && B1 >= kTriangleMinRows;
  std::optional<at::Tensor> K;
  auto add_gram = [&](const at::Tensor& G1, const at::Tensor& G2) {  // (B, P) rows
    const bool first = !K.has_value();
    if (diagonal) {
      if (first) K = at::zeros({B1}, A.options());
      const at::Tensor g1 = unit_rows(G1), g2 = unit_rows(G2);
      const S *p1 = g1.const_data_ptr<S>(), *p2 = g2.const_data_ptr<S>();
      const int64_t P = g1.size(1), s1 = g1.stride(0), s2 = g2.stride(0);
      S* o = K->data_ptr<S>();
      at::parallel_for(0, B1, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) o[i] += fast_dot(p1 + i * s1, p2 + i * s2, P);
      });
    } else if (syrk) {
      if (first) K = at::empty({B1, B1}, A.options());
      if constexpr (std::is_same_v<S, float>) {
        const at::Tensor g1 = unit_rows(G1);
        tiles::syrk_lower(g1.const_data_ptr<float>(), g1.stride(0), B1, g1.size(1),
                          K->data_ptr<float>(), B1, !first);
      }
    } else if (!triangle) {
      if (first) K = at::mm(G1, G2.t());
      else K->addmm_(G1, G2.t());
    } else {  // upper block rows of the symmetric K
      if (first) K = at::empty({B1, B1}, A.options());
      const int64_t nb = triangle_block(B1);
      for (int64_t r0 = 0; r0 < B1; r0 += nb) {
        const int64_t nr = std::min(nb, B1 - r0);
        at::Tensor block = K->narrow(0, r0, nr).narrow(1, r0, B1 - r0);
        const at::Tensor rows = G1.narrow(0, r0, nr), cols = G1.narrow(0, r0, B1 - r0).t();
        if (first) at::mm_out(block, rows, cols);
        else block.addmm_(rows, cols);
      }
    }
  };
  for (int64_t g = 0; g < groups; ++g) {
    const at::Tensor Ag = group(A, g, ka), A2g = group(A2, g, ka);
    for (int64_t lo = 0; lo < ke; lo += step) {
      const int64_t n = std::min(step, ke - lo);
      auto grads = [&](const at::Tensor& X, const at::Tensor& Y) {  // (B, n·ka)
        if constexpr (std::is_same_v<S, float>)
          if (tiled && X.stride(2) == 1 && Y.stride(2) == 1) {  // per sample E_iᵀ A_i in place
            at::Tensor G = at::empty({X.size(0), n * ka}, X.options());
            tiles::per_sample_grads(Y.const_data_ptr<float>(), Y.stride(0), Y.stride(1),
                                    X.const_data_ptr<float>(), X.stride(0), X.stride(1),
                                    X.size(0), X.size(1), g * ke + lo, n, ka,
                                    G.data_ptr<float>(), n * ka, ka);
            return G;
          }
        return at::bmm(part(Y, 2, g * ke + lo, n).transpose(1, 2), X).view({X.size(0), -1});
      };
      const at::Tensor G1 = grads(Ag, E);
      add_gram(G1, cross ? grads(A2g, E2) : G1);
    }
    if (bias) {  // the bias column of G_i: Σ_t e_it
      const at::Tensor S1 = group(E, g, ke).sum(1);
      add_gram(S1, cross ? group(E2, g, ke).sum(1) : S1);
    }
  }
  if (!K.has_value())  // no parameters (d_out = 0)
    return diagonal ? at::zeros({B1}, A.options()) : at::zeros({B1, B2}, A.options());
  if (!cross && !diagonal) mirror<S>(*K, syrk);
  return *K;
}

// gram_linear's checks: the same error types and messages as ops/_common.py
// check_linear_layer, check_cross and check_route.
void check_args(const at::Tensor& A, const at::Tensor& E, const std::optional<at::Tensor>& A2,
                const std::optional<at::Tensor>& E2, bool diagonal, c10::string_view route) {
  layer::check_linear_layer(kOp, A, E);
  check_cross(kOp, "A2", "E2", A, E, A2, E2, diagonal);
  TORCH_CHECK_VALUE(route == "auto" || route == "token_pair" || route == "per_sample", kOp,
                    ": route must be one of 'auto', 'token_pair', 'per_sample', got '",
                    std::string(route), "'");
}

at::Tensor tokens(const at::Tensor& X) { return X.dim() == 3 ? X : X.unsqueeze(1); }

std::optional<at::Tensor> tokens(const std::optional<at::Tensor>& X) {
  return X.has_value() ? std::optional<at::Tensor>(tokens(*X)) : std::nullopt;
}

// K of token tensors (B, T, groups·d) on the route named (auto: by choose_route).
at::Tensor gram_on_route(const at::Tensor& A, const at::Tensor& E, bool bias,
                         const std::optional<at::Tensor>& A2, const std::optional<at::Tensor>& E2,
                         bool diagonal, c10::string_view route, int64_t groups) {
  const bool cross = A2.has_value();
  const Route r = route == "token_pair" ? Route::kTokenPair
                  : route == "per_sample"
                      ? Route::kPerSample
                      : choose_route(A.size(0), cross ? A2->size(0) : A.size(0), A.size(1),
                                     A.size(2) / groups, E.size(2) / groups, groups, bias, cross,
                                     diagonal);
  return gram_tokens(A, E, bias, A2, E2, diagonal, r, groups);
}

at::Tensor gram_linear_cpu(const at::Tensor& A, const at::Tensor& E, bool bias,
                           const std::optional<at::Tensor>& A2,
                           const std::optional<at::Tensor>& E2, bool diagonal,
                           c10::string_view route) {
  check_args(A, E, A2, E2, diagonal, route);
  return gram_on_route(tokens(A), tokens(E), bias, tokens(A2), tokens(E2), diagonal, route, 1);
}

// The core with its route and groups forced (tests: every route and group count).
at::Tensor gram_tokens_testing(const at::Tensor& A, const at::Tensor& E, bool bias,
                               const std::optional<at::Tensor>& A2,
                               const std::optional<at::Tensor>& E2, bool diagonal,
                               c10::string_view route, int64_t groups) {
  return gram_on_route(tokens(A), tokens(E), bias, tokens(A2), tokens(E2), diagonal, route,
                       groups);
}

int64_t gram_route_testing(int64_t B1, int64_t B2, int64_t T, int64_t d_in, int64_t d_out,
                           int64_t groups, bool bias, bool cross, bool diagonal) {
  return choose_route(B1, B2, T, d_in, d_out, groups, bias, cross, diagonal) == Route::kTokenPair
             ? 0 : 1;
}

}  // namespace

// The flop model (per group, P = d_out·(d_in + b) parameters, `pairs` the entries of K computed:
// B1 (diagonal), B1·B2 (cross) or B1(B1 + 1)/2 (one triangle), `samples` = B1 (+ B2 if cross)):
//   token pair:  pairs·T²·(2(d_in + d_out) + kPairElementCost)
//   per sample:  2·samples·T·P + 2·pairs·P + kGradElementCost·samples·P
// Checked against measurement (1 thread, fp32, no bias; token pair / per sample, us):
//   B=4 T=64 64->192: 449 / 98 (model: 21.5 / 6.8 Mflop), B=4 T=32 128->128: 129 / 80
//   (5.4 / 4.9), B=16 T=1 256->256: 21 / 1077 (0.14 / 18 Mflop).
Route choose_route(int64_t B1, int64_t B2, int64_t T, int64_t d_in, int64_t d_out,
                   int64_t groups, bool bias, bool cross, bool diagonal) {
  const double pairs = diagonal ? B1 : cross ? double(B1) * B2 : double(B1) * (B1 + 1) / 2;
  const double samples = cross ? B1 + B2 : B1;
  const double params = double(d_out) * (d_in + (bias ? 1 : 0));
  const double token_pair = pairs * T * T * (2.0 * (d_in + d_out) + kPairElementCost);
  const double per_sample = 2.0 * samples * T * params + 2.0 * pairs * params +
                            kGradElementCost * samples * params;
  (void)groups;  // both routes scale with the group count
  return token_pair <= per_sample ? Route::kTokenPair : Route::kPerSample;
}

at::Tensor gram_tokens(const at::Tensor& A, const at::Tensor& E, bool bias,
                       const std::optional<at::Tensor>& A2, const std::optional<at::Tensor>& E2,
                       bool diagonal, Route route, int64_t groups) {
  const at::ScalarType acc = acc_type(A);
  const bool cross = A2.has_value();
  auto in_acc = [acc](const at::Tensor& X) { return X.scalar_type() == acc ? X : X.to(acc); };
  const at::Tensor A1 = in_acc(A), E1 = in_acc(E);
  const at::Tensor A2_ = cross ? in_acc(*A2) : A1, E2_ = cross ? in_acc(*E2) : E1;
  return AT_DISPATCH_FLOATING_TYPES(acc, "gram_tokens", [&] {
    return route == Route::kTokenPair
               ? token_pair<scalar_t>(A1, E1, A2_, E2_, bias ? 1 : 0, cross, diagonal, groups)
               : per_sample<scalar_t>(A1, E1, A2_, E2_, bias, cross, diagonal, groups);
  });
}

TORCH_LIBRARY_IMPL(lowrank_kernels, CPU, m) { m.impl("gram_linear", &gram_linear_cpu); }

TORCH_LIBRARY_FRAGMENT(lowrank_kernels_testing, m) {
  m.def("gram_tokens(Tensor A, Tensor E, bool bias, Tensor? A2, Tensor? E2, bool diagonal, "
        "str route, int groups) -> Tensor", &gram_tokens_testing);
  m.def("gram_route(int B1, int B2, int T, int d_in, int d_out, int groups, bool bias, "
        "bool cross, bool diagonal) -> int", &gram_route_testing);
}

}  // namespace lowrank::gram
