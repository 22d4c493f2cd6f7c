// lowrank_kernels::subspace_project / ::subspace_expand, CPU kernels registered on the public
// schemas (declared in lowrank_kernels/ops/subspace_project.py), with the ops' argument checks:
//
//   subspace_project  c = Pᵀ g          (k; float32, float64 for float64 inputs)
//   subspace_expand   w = base + P α    (D; base's dtype, P's without base)
//
// A float32 P (TWA's and a dense random subspace's bases) in AVX2/FMA registers, one pass over
// P, rows in parallel: row-major with k <= 64 (project: c += g_i P_i; expand: 8 row dots at a
// time, reduced by a transpose) or column-major (a QR's Q; project: 8 column dots at a time
// against a vector of g; expand: 8 columns at a time added into a block of w in L1/L2; the
// column count of a group a template constant, so its accumulators stay in registers); project
// sums row chunks of a fixed size in order, so its bits do not depend on the thread count.
// Measured at D = 300001, k = 16, 1 thread, column-major, interleaved: project 1.2-1.3x
// MKL's sgemv (P.T @ g), expand 1.2-1.4x addmv, both streaming P once. Otherwise BLAS
// (at::mv / at::addmv) on P in the accumulation dtype, a low-precision P converted a block of
// rows at a time (read once at its own width, never copied whole).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "lowrank/hd.h"
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LK_SUBSPACE_AVX2 1
#define LK_TARGET_AVX2_FMA __attribute__((target("avx2,fma")))
#else
#define LK_SUBSPACE_AVX2 0
#endif

namespace lowrank {
namespace {

constexpr index_t kChunkRows = 1 << 14;      // project: rows per partial sum
constexpr index_t kConvertEntries = 1 << 18;  // low-precision P: entries converted at a time
constexpr int64_t kMaxRegisterK = 64;         // 8 AVX vectors per row

#if LK_SUBSPACE_AVX2
bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

// Lanes 0 .. k - 8 v - 1 of the last vector of a row (all of them when k is a multiple of 8).
LK_TARGET_AVX2_FMA inline __m256i tail_mask(int64_t k) {
  const int rem = static_cast<int>(k % 8 == 0 ? 8 : k % 8);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(rem), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// P's row i, vector v (KV vectors, the last masked).
template <int KV>
LK_TARGET_AVX2_FMA inline __m256 row_vector(const float* row, int v, __m256i mask) {
  return v == KV - 1 ? _mm256_maskload_ps(row + 8 * v, mask) : _mm256_loadu_ps(row + 8 * v);
}

// c[0:k] = Σ_{r0 <= i < r1} g_i P_i (P_i: the row at P + i ld), 4 rows interleaved (KV <= 2),
// 2 (KV <= 4) or 1.
template <int KV>
LK_TARGET_AVX2_FMA void project_rows(const float* P, index_t ld, const float* g, index_t r0,
                                     index_t r1, int64_t k, float* c) {
  constexpr int R = KV <= 2 ? 4 : (KV <= 4 ? 2 : 1);
  const __m256i mask = tail_mask(k);
  __m256 acc[R][KV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < KV; ++v) acc[r][v] = _mm256_setzero_ps();
  index_t i = r0;
  for (; i + R <= r1; i += R)
    for (int r = 0; r < R; ++r) {
      const __m256 gi = _mm256_broadcast_ss(g + i + r);
      const float* row = P + (i + r) * ld;
      for (int v = 0; v < KV; ++v)
        acc[r][v] = _mm256_fmadd_ps(gi, row_vector<KV>(row, v, mask), acc[r][v]);
    }
  for (; i < r1; ++i) {
    const __m256 gi = _mm256_broadcast_ss(g + i);
    for (int v = 0; v < KV; ++v)
      acc[0][v] = _mm256_fmadd_ps(gi, row_vector<KV>(P + i * ld, v, mask), acc[0][v]);
  }
  for (int v = 0; v < KV; ++v) {
    __m256 s = acc[0][v];
    for (int r = 1; r < R; ++r) s = _mm256_add_ps(s, acc[r][v]);
    if (v == KV - 1)
      _mm256_maskstore_ps(c + 8 * v, mask, s);
    else
      _mm256_storeu_ps(c + 8 * v, s);
  }
}

// w_i = (base_i +) P_i · a for rows [r0, r1): 8 rows' dot vectors, summed across lanes by a
// transpose (hadd) into one vector of 8 results.
template <int KV>
LK_TARGET_AVX2_FMA void expand_rows(const float* P, index_t ld, const float* a, const float* base,
                                    index_t r0, index_t r1, int64_t k, float* w) {
  const __m256i mask = tail_mask(k);
  __m256 av[KV];
  for (int v = 0; v < KV; ++v) av[v] = row_vector<KV>(a, v, mask);
  index_t i = r0;
  for (; i + 8 <= r1; i += 8) {
    __m256 s[8];
    for (int r = 0; r < 8; ++r) {
      const float* row = P + (i + r) * ld;
      __m256 x = _mm256_mul_ps(row_vector<KV>(row, 0, mask), av[0]);
      for (int v = 1; v < KV; ++v) x = _mm256_fmadd_ps(row_vector<KV>(row, v, mask), av[v], x);
      s[r] = x;
    }
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(s[0], s[1]), _mm256_hadd_ps(s[2], s[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(s[4], s[5]), _mm256_hadd_ps(s[6], s[7]));
    // u0 = (rows 0-3: low halves' sums | rows 0-3: high halves' sums), u1 likewise for 4-7.
    __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                               _mm256_permute2f128_ps(u0, u1, 0x31));
    if (base) sum = _mm256_add_ps(_mm256_loadu_ps(base + i), sum);
    _mm256_storeu_ps(w + i, sum);
  }
  for (; i < r1; ++i) {
    const float* row = P + i * ld;
    float x = 0.0f;
    for (int64_t j = 0; j < k; ++j) x += row[j] * a[j];
    w[i] = base ? base[i] + x : x;
  }
}

// Column-major P (P_ij at P + i + j ld): c_j = Σ_{r0 <= i < r1} P_ij g_i for the G columns
// at P, one vector of g against G column vectors (the chunk of g stays in L1 across groups).
template <int G>
LK_TARGET_AVX2_FMA void project_column_group(const float* P, index_t ld, const float* g,
                                             index_t r0, index_t r1, float* c) {
  __m256 acc[G];
  for (int j = 0; j < G; ++j) acc[j] = _mm256_setzero_ps();
  index_t i = r0;
  for (; i + 8 <= r1; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    for (int j = 0; j < G; ++j) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(P + i + j * ld), gv, acc[j]);
  }
  for (int j = 0; j < G; ++j) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[j]), _mm256_extractf128_ps(acc[j], 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    float x = _mm_cvtss_f32(s);
    for (index_t r = i; r < r1; ++r) x += P[r + j * ld] * g[r];
    c[j] = x;
  }
}

// dst[0:n] = src[0:n] + Σ_{q < G} a_q P_q (columns P_q at P + q ld), 16 rows at a time.
template <int G>
LK_TARGET_AVX2_FMA void expand_column_group(const float* P, index_t ld, const float* a,
                                            const float* src, float* dst, index_t n) {
  __m256 av[G];
  for (int q = 0; q < G; ++q) av[q] = _mm256_broadcast_ss(a + q);
  index_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 x0 = _mm256_loadu_ps(src + i), x1 = _mm256_loadu_ps(src + i + 8);
    for (int q = 0; q < G; ++q) {
      x0 = _mm256_fmadd_ps(_mm256_loadu_ps(P + q * ld + i), av[q], x0);
      x1 = _mm256_fmadd_ps(_mm256_loadu_ps(P + q * ld + i + 8), av[q], x1);
    }
    _mm256_storeu_ps(dst + i, x0);
    _mm256_storeu_ps(dst + i + 8, x1);
  }
  for (; i < n; ++i) {
    float x = src[i];
    for (int q = 0; q < G; ++q) x += P[q * ld + i] * a[q];
    dst[i] = x;
  }
}

// F<G>::run(j, args...) for the columns of P in groups of 8 and one group of the k % 8 left
// (G a compile-time constant: the accumulators stay in registers, no per-column branch).
template <template <int> class F, class... Args>
void by_column_groups(int64_t k, Args... args) {
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) F<8>::run(j, args...);
  switch (k - j) {
    case 1: F<1>::run(j, args...); break;
    case 2: F<2>::run(j, args...); break;
    case 3: F<3>::run(j, args...); break;
    case 4: F<4>::run(j, args...); break;
    case 5: F<5>::run(j, args...); break;
    case 6: F<6>::run(j, args...); break;
    case 7: F<7>::run(j, args...); break;
    default: break;
  }
}
template <int G>
struct ProjectColumns {  // (j, P, ld, g, r0, r1, c): columns j .. j + G - 1
  static void run(int64_t j, const float* P, index_t ld, const float* g, index_t r0, index_t r1,
                  float* c) {
    project_column_group<G>(P + j * ld, ld, g, r0, r1, c + j);
  }
};
template <int G>
struct ExpandColumns {  // (j, P, ld, a, w, n): w[0:n] += P[:, j .. j + G - 1] a[j ..]
  static void run(int64_t j, const float* P, index_t ld, const float* a, const float* src,
                  float* w, index_t n) {
    expand_column_group<G>(P + j * ld, ld, a + j, j == 0 ? src : w, w, n);
  }
};

// Column-major P: w = (base +) P a for rows [r0, r1), in blocks of 8192 rows (32 KiB of w,
// in L1/L2) into which 8 columns at a time are added.
LK_TARGET_AVX2_FMA void expand_columns(const float* P, index_t ld, const float* a,
                                       const float* base, index_t r0, index_t r1, int64_t k,
                                       float* w) {
  constexpr index_t kBlock = 8192;
  for (index_t i0 = r0; i0 < r1; i0 += kBlock) {
    const index_t n = std::min(kBlock, r1 - i0);
    float* wb = w + i0;
    if (base == nullptr) std::fill(wb, wb + n, 0.0f);
    by_column_groups<ExpandColumns>(k, P + i0, ld, a, base ? base + i0 : wb, wb, n);
  }
}

template <template <int> class F, class... Args>
void by_vectors(int64_t k, Args... args) {
  switch ((k + 7) / 8) {
    case 1: F<1>::run(args...); break;
    case 2: F<2>::run(args...); break;
    case 3: F<3>::run(args...); break;
    case 4: F<4>::run(args...); break;
    case 5: F<5>::run(args...); break;
    case 6: F<6>::run(args...); break;
    case 7: F<7>::run(args...); break;
    default: F<8>::run(args...); break;
  }
}
template <int KV>
struct ProjectRows {
  template <class... A>
  static void run(A... a) { project_rows<KV>(a...); }
};
template <int KV>
struct ExpandRows {
  template <class... A>
  static void run(A... a) { expand_rows<KV>(a...); }
};
#endif

// Which register kernel takes P: a float32 P on a CPU with AVX2 and FMA, with unit column
// stride and 1 <= k <= 64 (rows), or unit row stride (columns), D, k >= 1.
enum class Layout { kNone, kRows, kColumns };

Layout register_layout(const at::Tensor& P) {
#if LK_SUBSPACE_AVX2
  const index_t D = P.size(0), k = P.size(1);
  if (P.scalar_type() != at::kFloat || D < 1 || k < 1 || !cpu_has_avx2_fma()) return Layout::kNone;
  if (P.stride(1) == 1 && P.stride(0) >= k && k <= kMaxRegisterK) return Layout::kRows;
  if (P.stride(0) == 1 && P.stride(1) >= D) return Layout::kColumns;
#endif
  return Layout::kNone;
}

#if LK_SUBSPACE_AVX2
// c[0:k] += Pᵀ g for a P that a register kernel takes (g: P's D rows): chunks of kChunkRows
// rows in parallel, their partial sums added in order (the bits do not depend on the thread
// count).
void project_register(const at::Tensor& P, Layout layout, const float* g, float* c) {
  const index_t D = P.size(0), k = P.size(1);
  const index_t chunks = (D + kChunkRows - 1) / kChunkRows;
  std::vector<float> partial(chunks * k);
  const float* p = P.const_data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](index_t begin, index_t end) {
    for (index_t ch = begin; ch < end; ++ch) {
      const index_t r0 = ch * kChunkRows, r1 = std::min(D, r0 + kChunkRows);
      float* out = partial.data() + ch * k;
      if (layout == Layout::kRows)
        by_vectors<ProjectRows>(k, p, P.stride(0), g, r0, r1, k, out);
      else
        by_column_groups<ProjectColumns>(k, p, P.stride(1), g, r0, r1, out);
    }
  });
  for (index_t ch = 0; ch < chunks; ++ch)  // in order
    for (index_t j = 0; j < k; ++j) c[j] += partial[ch * k + j];
}
#endif

// Python's _checks messages, in the same words.
void check_float(const char* op, const char* name, const at::Tensor& t) {
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
                   op, ": ", name, " must have a floating dtype (float32, float16, bfloat16, "
                   "float64), got ", dt);
}

void check_tensor(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                  const char* doc) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be a ", dim, "-D tensor (", doc,
                    "), got shape ", t.sizes());
  check_float(op, name, t);
}

void check_basis(const char* op, const at::Tensor& P) {
  check_tensor(op, "P", P, 2, "D x k: the basis, one column per direction");
  TORCH_CHECK_VALUE(!P.requires_grad(), op, ": P must not require grad (it is a constant basis)");
}

void check_same_device(const char* op, const char* name, const at::Tensor& P, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device() == P.device(), op, ": P and ", name, " must have the same device, "
                    "got P: ", P.device(), ", ", name, ": ", t.device());
}

void check_float64_together(const char* op, std::initializer_list<const char*> names,
                            std::initializer_list<at::Tensor> tensors) {
  bool any = false, all = true;
  for (const auto& t : tensors) {
    any = any || t.scalar_type() == at::kDouble;
    all = all && t.scalar_type() == at::kDouble;
  }
  if (!any || all) return;
  std::string listing;
  auto n = names.begin();
  for (const auto& t : tensors) {
    if (!listing.empty()) listing += ", ";
    listing += std::string(*n++) + ": " + std::string(c10::toString(t.scalar_type()));
  }
  TORCH_CHECK_TYPE(false, op, ": float64 inputs must all be float64 (", listing, ")");
}

// Rows [lo, lo + n) of P in the accumulation dtype (a view when it is that dtype already).
at::Tensor rows_as(const at::Tensor& P, index_t lo, index_t n, at::ScalarType acc) {
  return P.narrow(0, lo, n).to(acc);
}

at::Tensor subspace_project_cpu(const at::Tensor& P, const at::Tensor& g) {
  constexpr const char* op = "subspace_project";
  check_basis(op, P);
  check_tensor(op, "g", g, 1, "D: the vector to project");
  check_same_device(op, "g", P, g);
  TORCH_CHECK_VALUE(P.size(0) == g.size(0), op, ": P and g must have the same length D (P dim 0), "
                    "got ", P.size(0), " and ", g.size(0));
  check_float64_together(op, {"P", "g"}, {P, g});
  const auto acc = P.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor v = g.to(acc).contiguous();
  const index_t D = P.size(0), k = P.size(1);
#if LK_SUBSPACE_AVX2
  if (const Layout layout = register_layout(P); layout != Layout::kNone) {
    at::Tensor c = at::zeros({k}, v.options());
    project_register(P, layout, v.const_data_ptr<float>(), c.data_ptr<float>());
    return c;
  }
#endif
  if (P.scalar_type() == acc) return at::mv(P.t(), v);
  at::Tensor c = at::zeros({k}, v.options());
  const index_t step = std::max<index_t>(1, kConvertEntries / std::max<index_t>(k, 1));
  for (index_t lo = 0; lo < D; lo += step) {
    const index_t n = std::min(step, D - lo);
    c.addmv_(rows_as(P, lo, n, acc).t(), v.narrow(0, lo, n));
  }
  return c;
}

at::Tensor subspace_expand_cpu(const at::Tensor& P, const at::Tensor& alpha,
                               const std::optional<at::Tensor>& base) {
  constexpr const char* op = "subspace_expand";
  check_basis(op, P);
  check_tensor(op, "alpha", alpha, 1, "k: the coordinates");
  TORCH_CHECK_VALUE(P.size(1) == alpha.size(0), op, ": P and alpha must have the same k (P dim 1), "
                    "got ", P.size(1), " and ", alpha.size(0));
  if (base) {
    check_tensor(op, "base", *base, 1, "D: the point the subspace passes through");
    TORCH_CHECK_VALUE(P.size(0) == base->size(0), op, ": P and base must have the same length D "
                      "(P dim 0), got ", P.size(0), " and ", base->size(0));
    check_same_device(op, "alpha", P, alpha);
    check_same_device(op, "base", P, *base);
    check_float64_together(op, {"P", "alpha", "base"}, {P, alpha, *base});
  } else {
    check_same_device(op, "alpha", P, alpha);
    check_float64_together(op, {"P", "alpha"}, {P, alpha});
  }
  const auto acc = P.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto out_dtype = base ? base->scalar_type() : P.scalar_type();
  const at::Tensor a = alpha.to(acc).contiguous();
  const index_t D = P.size(0), k = P.size(1);
#if LK_SUBSPACE_AVX2
  if (const Layout layout = register_layout(P); layout != Layout::kNone) {
    const at::Tensor b = base ? base->to(acc).contiguous() : at::Tensor();
    at::Tensor w = at::empty({D}, a.options());
    const float* p = P.const_data_ptr<float>();
    const float* ap = a.const_data_ptr<float>();
    const float* bp = base ? b.const_data_ptr<float>() : nullptr;
    float* wp = w.data_ptr<float>();
    at::parallel_for(0, D, std::max<index_t>(2048, (1 << 14) / k), [&](index_t r0, index_t r1) {
      if (layout == Layout::kRows)
        by_vectors<ExpandRows>(k, p, P.stride(0), ap, bp, r0, r1, k, wp);
      else
        expand_columns(p, P.stride(1), ap, bp, r0, r1, k, wp);
    });
    return out_dtype == acc ? w : w.to(out_dtype);
  }
#endif
  if (P.scalar_type() == acc && out_dtype == acc)
    return base ? at::addmv(base->to(acc), P, a) : at::mv(P, a);
  at::Tensor w = at::empty({D}, P.options().dtype(out_dtype));
  const index_t step = std::max<index_t>(1, kConvertEntries / std::max<index_t>(k, 1));
  for (index_t lo = 0; lo < D; lo += step) {
    const index_t n = std::min(step, D - lo);
    const at::Tensor Pb = rows_as(P, lo, n, acc);
    w.narrow(0, lo, n).copy_(base ? at::addmv(base->narrow(0, lo, n).to(acc), Pb, a)
                                  : at::mv(Pb, a));
  }
  return w;
}

// ---- TWA's step on a CPU, fused (lowrank_kernels/optim/twa.py: the formulas and the skip rule)
//
//   c = Pᵀ g,  b' = μ b + (c + λ α),  α' = α − η (c + λ α + μ b'  if nesterov else  b'),
//   w = P α';  the step is taken (α, b, the trainable parameters ← α', b', w) when ‖c‖², Σ α'
//   and Σ w are finite (float32 sums: NaN/Inf propagate; ‖c‖² overflows for a loss × 1e30),
//   else skipped (nothing written); returns skipped + (1 if skipped).
//
// float32 P, α, b, parameters and gradients (contiguous), P's D rows = the parameters' values
// in order. One pass over P for c (each parameter's gradient read where it is, no flat copy),
// one for w into a scratch vector whose sum is taken while it is in cache, then one copy per
// trainable parameter: the flag is read on the host, which on a CPU is the device.
#if LK_SUBSPACE_AVX2
LK_TARGET_AVX2_FMA float sum_floats(const float* x, index_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  index_t i = 0;
  for (; i + 16 <= n; i += 16) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(x + i));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(x + i + 8));
  }
  a0 = _mm256_add_ps(a0, a1);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  float x0 = _mm_cvtss_f32(s);
  for (; i < n; ++i) x0 += x[i];
  return x0;
}
#else
float sum_floats(const float* x, index_t n) {
  float s = 0.0f;
  for (index_t i = 0; i < n; ++i) s += x[i];
  return s;
}
#endif

// c += P[r0 : r0 + n]ᵀ g (g: n values), in row chunks summed in order.
void project_segment(const at::Tensor& P, index_t r0, index_t n, const float* g, float* c) {
  const index_t k = P.size(1);
  const at::Tensor block = P.narrow(0, r0, n);
#if LK_SUBSPACE_AVX2
  if (const Layout layout = register_layout(block); layout != Layout::kNone) {
    project_register(block, layout, g, c);
    return;
  }
#endif
  const at::Tensor gv = at::from_blob(const_cast<float*>(g), {n}, block.options());
  const at::Tensor part = at::mv(block.t(), gv);
  const float* pp = part.const_data_ptr<float>();
  for (index_t j = 0; j < k; ++j) c[j] += pp[j];
}

// w = P a (D values) and Σ w (float32, summed a block at a time while it is in cache).
float expand_with_sum(const at::Tensor& P, const float* a, float* w) {
  const index_t D = P.size(0), k = P.size(1);
  constexpr index_t kBlock = 8192;
  const index_t blocks = (D + kBlock - 1) / kBlock;
  std::vector<float> sums(blocks);
#if LK_SUBSPACE_AVX2
  const Layout layout = register_layout(P);
#else
  const Layout layout = Layout::kNone;
#endif
  const at::Tensor av = at::from_blob(const_cast<float*>(a), {k}, P.options());
  at::parallel_for(0, blocks, 1, [&](index_t begin, index_t end) {
    for (index_t bl = begin; bl < end; ++bl) {
      const index_t r0 = bl * kBlock, r1 = std::min(D, r0 + kBlock);
#if LK_SUBSPACE_AVX2
      if (layout == Layout::kRows)
        by_vectors<ExpandRows>(k, P.const_data_ptr<float>(), P.stride(0), a,
                               static_cast<const float*>(nullptr), r0, r1, k, w);
      else if (layout == Layout::kColumns)
        expand_columns(P.const_data_ptr<float>(), P.stride(1), a, nullptr, r0, r1, k, w);
      else
#endif
      {
        at::Tensor out = at::from_blob(w + r0, {r1 - r0}, P.options());
        at::mv_out(out, P.narrow(0, r0, r1 - r0), av);
      }
      sums[bl] = sum_floats(w + r0, r1 - r0);
    }
  });
  float total = 0.0f;
  for (const float s : sums) total += s;  // in order
  return total;
}

at::Tensor twa_step_cpu(const at::Tensor& P, at::TensorList params,
                        const c10::List<std::optional<at::Tensor>>& grad_list, at::Tensor& alpha,
                        at::Tensor& buf, const at::Tensor& skipped, double lr, double momentum,
                        double weight_decay, bool nesterov) {
  constexpr const char* op = "twa_step";
  const index_t D = P.size(0), k = P.size(1);
  TORCH_CHECK_VALUE(P.dim() == 2 && P.scalar_type() == at::kFloat, op, ": P must be a 2-D "
                    "float32 tensor, got ", P.scalar_type(), " of shape ", P.sizes());
  TORCH_CHECK_VALUE(params.size() == grad_list.size(), op, ": params and grads must have the "
                    "same length, got ", params.size(), " and ", grad_list.size());
  std::vector<at::Tensor> grads;
  for (const std::optional<at::Tensor> g : grad_list) grads.push_back(g ? *g : at::Tensor());
  for (const at::Tensor* t : {&alpha, &buf})  // buf: read and written only with momentum
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->dim() == 1 && t->is_contiguous() &&
                      (t->size(0) == k || (t == &buf && momentum == 0.0)), op, ": alpha and "
                      "buf must be contiguous float32 k-vectors (k = ", k, "), got ",
                      t->scalar_type(), " ", t->sizes());
  index_t total_rows = 0;
  for (size_t q = 0; q < params.size(); ++q) {
    const at::Tensor& p = params[q];
    TORCH_CHECK_VALUE(p.scalar_type() == at::kFloat && p.is_contiguous(), op, ": params[", q,
                      "] must be a contiguous float32 tensor");
    TORCH_CHECK_VALUE(!grads[q].defined() || (grads[q].scalar_type() == at::kFloat &&
                      grads[q].is_contiguous() && grads[q].numel() == p.numel()), op,
                      ": grads[", q, "] must be None or a contiguous float32 tensor of params[",
                      q, "]'s size");
    total_rows += p.numel();
  }
  TORCH_CHECK_VALUE(total_rows == D, op, ": the parameters hold ", total_rows,
                    " values, P has D = ", D, " rows");
  // c = Pᵀ g: the parameters' gradients where they are (None: zero rows, left out).
  std::vector<float> c(k, 0.0f);
  index_t offset = 0;
  for (size_t q = 0; q < params.size(); ++q) {
    const index_t n = params[q].numel();
    if (grads[q].defined() && n > 0)
      project_segment(P, offset, n, grads[q].const_data_ptr<float>(), c.data());
    offset += n;
  }
  // The coordinates, as TWA.step computes them (float32 arithmetic, float32 scalars).
  const float eta = static_cast<float>(lr), mu = static_cast<float>(momentum);
  const float wd = static_cast<float>(weight_decay);
  const float* a = alpha.const_data_ptr<float>();
  const float* b = buf.const_data_ptr<float>();
  std::vector<float> new_alpha(k), new_buf(k);
  float norm2 = 0.0f, alpha_sum = 0.0f;
  for (index_t j = 0; j < k; ++j) {
    norm2 += c[j] * c[j];
    float d = weight_decay != 0.0 ? c[j] + wd * a[j] : c[j];
    if (momentum != 0.0) {
      new_buf[j] = b[j] * mu + d;
      d = nesterov ? d + mu * new_buf[j] : new_buf[j];
    }
    new_alpha[j] = a[j] - eta * d;
    alpha_sum += new_alpha[j];
  }
  at::Tensor w = at::empty({D}, P.options());
  float* wp = w.data_ptr<float>();
  const float w_sum = expand_with_sum(P, new_alpha.data(), wp);
  const bool ok = std::isfinite(norm2) && std::isfinite(alpha_sum) && std::isfinite(w_sum);
  if (ok) {
    std::copy(new_alpha.begin(), new_alpha.end(), alpha.data_ptr<float>());
    if (momentum != 0.0) std::copy(new_buf.begin(), new_buf.end(), buf.data_ptr<float>());
    offset = 0;
    for (const at::Tensor& p : params) {
      const index_t n = p.numel();
      if (p.requires_grad()) std::copy(wp + offset, wp + offset + n, p.data_ptr<float>());
      offset += n;
    }
  }
  return ok ? skipped.clone() : skipped.add(1);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_kernels, CPU, m) {
  m.impl("subspace_project", &subspace_project_cpu);
  m.impl("subspace_expand", &subspace_expand_cpu);
}

// TWA's fused CPU step (lowrank_kernels/optim/twa.py calls it; not a public op).
TORCH_LIBRARY_FRAGMENT(lowrank_kernels_twa, m) {
  m.def("twa_step(Tensor P, Tensor(c!)[] params, Tensor?[] grads, Tensor(a!) alpha, "
        "Tensor(b!) buf, Tensor skipped, float lr, float momentum, float weight_decay, "
        "bool nesterov) -> Tensor");
}
TORCH_LIBRARY_IMPL(lowrank_kernels_twa, CPU, m) { m.impl("twa_step", &twa_step_cpu); }

}  // namespace lowrank
