// Per-matrix arithmetic of the batched Woodbury solve X = (K + λI)⁻¹ R: a blocked
// left/right-looking Cholesky of the damped lower triangle, both triangular solves, the
// jitter ladder and the failure codes. Torch-free and __host__ __device__.
//
// The whole per-member algorithm, `woodbury_solve_member`, is written once against an
// execution policy `Exec`:
//   for_each(count, f)      run f(e) for e in [0, count) (CUDA: strided over the block's
//                           threads, then __syncthreads; CPU: a loop)
//   for_each_any(count, f)  the same, returning whether any f(e) returned true
//   column_steps(steps, f, count, g)
//                           f(c, lane) for c in [0, steps), lanes [0, 32) of one warp in
//                           lock-step (CUDA: warp 0 and __syncwarp; CPU: nested loops); stops at
//                           the first c where f returns false (all lanes agree) and returns it,
//                           or -1 — and, concurrently (CUDA: the other warps), g(e) for e in
//                           [0, count), items independent of f's data
//   uniform(f)              f() evaluated once, its double value returned to every thread
//   single(f)               f() run once
// The CUDA kernel (one block per batch member) runs it with BlockExec, the CPU kernel and the
// ctest with SerialExec below, so the CPU tests exercise exactly the code path of every
// thread of the CUDA kernel, phase by phase.
//
// Storage: K + λI is padded to nt·nb rows (nb = kWbTile) with an identity block, and its lower
// triangle is kept as nt(nt+1)/2 column-major nb×nb tiles (leading dimension nb + 1, so that
// neighbouring rows and neighbouring columns fall in different shared-memory banks); tile
// (I, J), I ≥ J, starts at wb_tile_offset(I, J). Only the lower triangle of K (k ≤ i) is read.
#pragma once
#include <cmath>

#include "lowrank/hd.h"
#if defined(__CUDACC__) || defined(LOWRANK_WITH_CUDA)
#include <cuda_runtime.h>
#endif

#if defined(__CUDACC__)
#define LK_WB_UNROLL _Pragma("unroll")
#else
#define LK_WB_UNROLL
#endif

namespace lowrank {
namespace core {

constexpr int kWbTile = 16;              // nb: tile edge of the blocked Cholesky
constexpr int kWbLd = kWbTile + 1;       // padded leading dimension of a tile
constexpr int kWbTileElems = kWbTile * kWbLd;
constexpr int kWbMicro = 4;              // micro-tile edge of the trailing update
constexpr int kWbMicroPerTile = (kWbTile / kWbMicro) * (kWbTile / kWbMicro);

// info codes (besides 0 = solved and k in [1, n] = leading minor of order k not positive
// definite at the last damping tried).
constexpr int kInfoNonFinite = -1;  // NaN/Inf in the read triangle of K or in R
constexpr int kInfoOverflow = -2;   // factor fine but the solution overflowed to Inf/NaN
constexpr int kInfoBadDamping = -3; // the damping is negative, NaN or Inf

LK_HD index_t wb_tiles(index_t n) { return (n + kWbTile - 1) / kWbTile; }
LK_HD index_t wb_tile_count(index_t nt) { return nt * (nt + 1) / 2; }
// Elements of the tile storage of one n×n member.
LK_HD index_t wb_storage_elems(index_t n) {
  return wb_tile_count(wb_tiles(n)) * kWbTileElems;
}
LK_HD index_t wb_tile_offset(index_t I, index_t J) {
  return (I * (I + 1) / 2 + J) * kWbTileElems;
}
// t-th (I, J) with I ≥ J in row-major order of the lower triangle: t = I(I+1)/2 + J.
LK_HD void wb_tri_unrank(index_t t, index_t& I, index_t& J) {
  index_t i = static_cast<index_t>((sqrt(8.0 * static_cast<double>(t) + 1.0) - 1.0) * 0.5);
  while (i * (i + 1) / 2 > t) --i;
  while ((i + 1) * (i + 2) / 2 <= t) ++i;
  I = i;
  J = t - i * (i + 1) / 2;
}

// False for NaN and ±Inf (x − x is NaN for both); needs IEEE arithmetic (no fast-math).
template <typename T>
LK_HD bool wb_finite(T x) { return x - x == T(0); }

template <typename T>
LK_HD T wb_sqrt(T x) {
#if defined(__CUDA_ARCH__)
  return sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// jitter scale s = mean_i |K_ii| (accumulated in double, in index order), 1 when it is 0.
template <typename T>
LK_HD double wb_diag_abs_mean(const T* K, index_t n, index_t diag_stride) {
  double s = 0.0;
  for (index_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(K[i * diag_stride]);
    s += v < 0.0 ? -v : v;
  }
  s = n > 0 ? s / static_cast<double>(n) : 0.0;
  return s > 0.0 ? s : 1.0;
}

// The shift of rung p (p = 0, 1, ...) of the jitter ladder, in T: (jitter·s)·10^p, the
// multiplications by 10 done one at a time in T.
template <typename T>
LK_HD T wb_jitter_shift(double jitter, int p, double scale) {
  T shift = static_cast<T>(jitter) * static_cast<T>(scale);
  for (int i = 0; i < p; ++i) shift *= T(10);
  return shift;
}

// Tile element (row r, column c) of the tile storage. Row kWbTile is padding; in a factored
// diagonal tile it holds the reciprocals 1/L_cc that the triangular solves multiply by.
LK_HD index_t wb_at(int r, int c) { return static_cast<index_t>(c) * kWbLd + r; }
LK_HD index_t wb_recip(int c) { return wb_at(kWbTile, c); }

// Column step c of the unblocked Cholesky of a diagonal tile D, for one lane (row) of a warp.
// Before step c, D(r, r) holds the running pivot a_rr − Σ_{k<c} L_rk² of every row r ≥ c and
// rows' entries k < c are final. Lane c records L_cc = √d_c (in ldiag, its reciprocal in linv;
// D(c, c) itself is left to the caller, since other lanes read it during this step); lanes r > c
// compute L_rc = (a_rc − Σ_{k<c} L_rk L_ck)/L_cc and subtract L_rc² from their own pivot (the
// same subtractions, in the same order, as a left-looking a_rr − Σ_k L_rk², but off the
// critical path from one step to the next). Returns false (on every lane alike) when d_c is not
// a finite positive number.
template <typename T>
LK_HD bool wb_diag_tile_step(T* D, int c, int lane, T* ldiag, T* linv) {
  const T d = D[wb_at(c, c)];
  if (!(d > T(0)) || !wb_finite(d)) return false;
  const T l = wb_sqrt(d);
  const T inv = T(1) / l;
  if (lane == c) {
    ldiag[c] = l;
    linv[c] = inv;
  }
  if (lane > c && lane < kWbTile) {
    T s = D[wb_at(lane, c)];
    for (int k = 0; k < c; ++k) s -= D[wb_at(lane, k)] * D[wb_at(c, k)];
    const T lrc = s * inv;
    D[wb_at(lane, c)] = lrc;
    D[wb_at(lane, lane)] -= lrc * lrc;
  }
  return true;
}

// Row rl of the panel tile P = A_IJ ← A_IJ L_JJ⁻ᵀ (forward substitution along the row, the row
// held in registers).
template <typename T>
LK_HD void wb_trsm_row(T* P, const T* D, int rl, const T* linv) {
  T x[kWbTile];
LK_WB_UNROLL
  for (int c = 0; c < kWbTile; ++c) x[c] = P[wb_at(rl, c)];
LK_WB_UNROLL
  for (int c = 0; c < kWbTile; ++c) {
    T s = x[c];
LK_WB_UNROLL
    for (int k = 0; k < c; ++k) s -= x[k] * D[wb_at(c, k)];
    x[c] = s * linv[c];
  }
LK_WB_UNROLL
  for (int c = 0; c < kWbTile; ++c) P[wb_at(rl, c)] = x[c];
}

// Micro-tile (r0.., c0..) of the trailing update A_IK ← A_IK − L_IJ L_KJᵀ.
template <typename T>
LK_HD void wb_update_micro(T* dst, const T* a, const T* b, int r0, int c0) {
  T acc[kWbMicro][kWbMicro];
  for (int i = 0; i < kWbMicro; ++i)
    for (int j = 0; j < kWbMicro; ++j) acc[i][j] = T(0);
LK_WB_UNROLL
  for (int k = 0; k < kWbTile; ++k) {
    T ar[kWbMicro], br[kWbMicro];
    for (int i = 0; i < kWbMicro; ++i) ar[i] = a[wb_at(r0 + i, k)];
    for (int j = 0; j < kWbMicro; ++j) br[j] = b[wb_at(c0 + j, k)];
    for (int i = 0; i < kWbMicro; ++i)
      for (int j = 0; j < kWbMicro; ++j) acc[i][j] += ar[i] * br[j];
  }
  for (int i = 0; i < kWbMicro; ++i)
    for (int j = 0; j < kWbMicro; ++j) dst[wb_at(r0 + i, c0 + j)] -= acc[i][j];
}

// y ← L_JJ⁻¹ y for the first m (≤ nb) rows of one right-hand side (x: stride xs); multiplies by
// the stored reciprocals, so the chain from one row to the next is one FMA and one multiply.
template <typename T>
LK_HD void wb_forward_tile(const T* D, int m, T* x, index_t xs) {
  T y[kWbTile];  // fully unrolled loops keep y in registers
LK_WB_UNROLL
  for (int c = 0; c < kWbTile; ++c) {
    if (c < m) {
      T s = x[c * xs];
LK_WB_UNROLL
      for (int k = 0; k < c; ++k) s -= D[wb_at(c, k)] * y[k];
      y[c] = s * D[wb_recip(c)];
      x[c * xs] = y[c];
    }
  }
}

// x_i ← x_i − Σ_{c<m} L_IJ(rl, c) y_c (y: the solved rows of tile J, stride xs).
template <typename T>
LK_HD void wb_forward_update(const T* P, int rl, int m, const T* y, index_t xs, T* xi) {
  T s = *xi;
LK_WB_UNROLL
  for (int c = 0; c < kWbTile; ++c)
    if (c < m) s -= P[wb_at(rl, c)] * y[c * xs];
  *xi = s;
}

// x ← L_JJ⁻ᵀ x for the first m rows of one right-hand side.
template <typename T>
LK_HD void wb_backward_tile(const T* D, int m, T* x, index_t xs) {
  T v[kWbTile];  // fully unrolled loops keep v in registers; rows ≥ m are skipped
LK_WB_UNROLL
  for (int c = kWbTile - 1; c >= 0; --c) {
    if (c < m) {
      T s = x[c * xs];
LK_WB_UNROLL
      for (int k = c + 1; k < kWbTile; ++k)
        if (k < m) s -= D[wb_at(k, c)] * v[k];
      v[c] = s * D[wb_recip(c)];
      x[c * xs] = v[c];
    }
  }
}

// y_k ← y_k − Σ_{c<m} L_JK(c, kl) x_c (x: the solved rows of tile J).
template <typename T>
LK_HD void wb_backward_update(const T* P, int kl, int m, const T* x, index_t xs, T* yk) {
  T s = *yk;
LK_WB_UNROLL
  for (int c = 0; c < kWbTile; ++c)
    if (c < m) s -= P[wb_at(c, kl)] * x[c * xs];
  *yk = s;
}

// One batch member. K: n×n (strides ks0, ks1; only k ≤ i read), R: n×r (strides rs0, rs1),
// X: n×r contiguous output.
template <typename T>
struct WbMember {
  const T* K;
  index_t ks0, ks1;
  const T* R;
  index_t rs0, rs1;
  T* X;
  index_t n, r;
  T damping;
  double jitter;
  int max_tries;
};

// tiles: wb_storage_elems(n) elements; ldiag, linv: kWbTile each.
template <typename T>
struct WbScratch {
  T* tiles;
  T* ldiag;
  T* linv;
};

// tiles ← tril(K) + lam·I padded with an identity block, a tile row (16 entries of a row of K)
// per item; true when a read entry is not finite.
template <typename T, typename Exec>
LK_HD bool wb_load(Exec& ex, const WbMember<T>& m, T* tiles, T lam) {
  const index_t nt = wb_tiles(m.n);
  return ex.for_each_any(wb_tile_count(nt) * kWbTile, [&](index_t e) {
    index_t I, J;
    wb_tri_unrank(e / kWbTile, I, J);
    const int rl = static_cast<int>(e % kWbTile);
    const index_t i = I * kWbTile + rl;
    T* dst = tiles + wb_tile_offset(I, J);
    bool bad = false;
    for (int cl = 0; cl < kWbTile; ++cl) {
      const index_t k = J * kWbTile + cl;
      T v = T(0);
      if (k <= i) {
        if (i >= m.n) {
          v = i == k ? T(1) : T(0);
        } else {
          v = m.K[i * m.ks0 + k * m.ks1];
          bad = bad || !wb_finite(v);
          if (i == k) v += lam;
        }
      }
      dst[wb_at(rl, cl)] = v;
    }
    return bad;
  });
}

// Micro-tile item e of the trailing update of tile (I, K) by column J.
template <typename T>
LK_HD void wb_update_item(T* tiles, index_t I, index_t K, index_t J, int mt) {
  const int mr = mt / (kWbTile / kWbMicro), mc = mt % (kWbTile / kWbMicro);
  if (I == K && mc > mr) return;  // above the diagonal of a diagonal tile
  wb_update_micro(tiles + wb_tile_offset(I, K), tiles + wb_tile_offset(I, J),
                  tiles + wb_tile_offset(K, J), mr * kWbMicro, mc * kWbMicro);
}

// Blocked right-looking Cholesky of the loaded tiles in place, with look-ahead: for each tile
// column J, (1) the diagonal of L_JJ and the panel L_IJ = A_IJ L_JJ⁻ᵀ; (2) the update of tile
// column J + 1 by column J; (3) the factorization of the diagonal tile J + 1 (one warp, column
// steps) while the other warps update the tiles right of column J + 1 — disjoint tiles.
// Returns 0, or k when the leading minor of order k is not positive definite (the pivot of row
// k − 1 is ≤ 0 or not finite).
template <typename T, typename Exec>
LK_HD int wb_factor(Exec& ex, index_t n, const WbScratch<T>& s) {
  const index_t nt = wb_tiles(n);
  if (nt == 0) return 0;
  int failed = ex.column_steps(
      kWbTile,
      [&](int c, int lane) { return wb_diag_tile_step(s.tiles, c, lane, s.ldiag, s.linv); },
      index_t(0), [](index_t) {});
  if (failed >= 0) return failed + 1;
  for (index_t J = 0; J < nt; ++J) {
    T* D = s.tiles + wb_tile_offset(J, J);
    const index_t below = (nt - 1 - J) * kWbTile;
    ex.for_each(kWbTile + below, [&](index_t e) {
      if (e < kWbTile) {
        D[wb_at(static_cast<int>(e), static_cast<int>(e))] = s.ldiag[e];
        D[wb_recip(static_cast<int>(e))] = s.linv[e];
      } else {
        const index_t row = e - kWbTile;
        wb_trsm_row(s.tiles + wb_tile_offset(J + 1 + row / kWbTile, J), D,
                    static_cast<int>(row % kWbTile), s.linv);
      }
    });
    if (J + 1 == nt) break;
    const index_t m = nt - 1 - J;  // tiles below the diagonal tile J
    ex.for_each(m * kWbMicroPerTile, [&](index_t e) {
      wb_update_item(s.tiles, J + 1 + e / kWbMicroPerTile, J + 1, J,
                     static_cast<int>(e % kWbMicroPerTile));
    });
    T* next = s.tiles + wb_tile_offset(J + 1, J + 1);
    failed = ex.column_steps(
        kWbTile, [&](int c, int lane) { return wb_diag_tile_step(next, c, lane, s.ldiag, s.linv); },
        wb_tile_count(m - 1) * kWbMicroPerTile, [&](index_t e) {
          index_t a, b;
          wb_tri_unrank(e / kWbMicroPerTile, a, b);
          wb_update_item(s.tiles, J + 2 + a, J + 2 + b, J, static_cast<int>(e % kWbMicroPerTile));
        });
    if (failed >= 0) return static_cast<int>((J + 1) * kWbTile + failed + 1);
  }
  return 0;
}

// X ← L⁻ᵀ L⁻¹ X, blocked by tiles: a thread per right-hand side for each diagonal tile, an
// item per (row, right-hand side) for each panel update.
template <typename T, typename Exec>
LK_HD void wb_solve(Exec& ex, const WbMember<T>& m, const T* tiles) {
  const index_t n = m.n, r = m.r, nt = wb_tiles(n);
  T* X = m.X;
  for (index_t J = 0; J < nt; ++J) {
    const index_t row0 = J * kWbTile;
    const int rows = static_cast<int>(n - row0 < kWbTile ? n - row0 : kWbTile);
    const T* D = tiles + wb_tile_offset(J, J);
    ex.for_each(r, [&](index_t q) { wb_forward_tile(D, rows, X + row0 * r + q, r); });
    const index_t below = n - row0 - rows;
    ex.for_each(below * r, [&](index_t e) {
      const index_t q = e % r, i = row0 + rows + e / r;  // q fastest: X rows contiguous
      wb_forward_update(tiles + wb_tile_offset(i / kWbTile, J), static_cast<int>(i % kWbTile),
                        rows, X + row0 * r + q, r, X + i * r + q);
    });
  }
  for (index_t J = nt - 1; J >= 0; --J) {
    const index_t row0 = J * kWbTile;
    const int rows = static_cast<int>(n - row0 < kWbTile ? n - row0 : kWbTile);
    const T* D = tiles + wb_tile_offset(J, J);
    ex.for_each(r, [&](index_t q) { wb_backward_tile(D, rows, X + row0 * r + q, r); });
    ex.for_each(row0 * r, [&](index_t e) {
      const index_t q = e % r, k = e / r;
      wb_backward_update(tiles + wb_tile_offset(J, k / kWbTile), static_cast<int>(k % kWbTile),
                         rows, X + row0 * r + q, r, X + k * r + q);
    });
  }
}

// The whole member: X = (K + λ'I)⁻¹ R with λ' = λ, or the first rung of the jitter ladder
// λ + (jitter·s)·10^p (p = 0 .. max_tries−1, s = wb_diag_abs_mean) whose factorization
// succeeds. Writes *info (0, k ∈ [1, n], kInfoNonFinite, kInfoOverflow or kInfoBadDamping)
// and *damping_used;
// X is zero whenever *info ≠ 0.
template <typename T, typename Exec>
LK_HD void woodbury_solve_member(Exec& ex, const WbMember<T>& m, const WbScratch<T>& s,
                                 int* info, T* damping_used) {
  const index_t nr = m.n * m.r;
  const bool bad_rhs = ex.for_each_any(nr, [&](index_t e) {
    const T v = m.R[(e / m.r) * m.rs0 + (e % m.r) * m.rs1];
    m.X[e] = v;
    return !wb_finite(v);
  });
  int status = 0;
  T used = m.damping;
  double scale = -1.0;
  const bool bad_damping = !(m.damping >= T(0) && wb_finite(m.damping));
  for (int attempt = 0;; ++attempt) {
    if (bad_damping) {
      status = kInfoBadDamping;
      break;
    }
    const T lam = attempt == 0 ? m.damping
                               : m.damping + wb_jitter_shift<T>(m.jitter, attempt - 1, scale);
    const bool bad_k = wb_load(ex, m, s.tiles, lam);
    if (bad_rhs || bad_k) {
      status = kInfoNonFinite;
      break;
    }
    used = lam;
    status = wb_factor(ex, m.n, s);
    if (status == 0 || attempt >= m.max_tries || !(m.jitter > 0.0)) break;
    if (scale < 0.0)
      scale = ex.uniform([&] { return wb_diag_abs_mean(m.K, m.n, m.ks0 + m.ks1); });
  }
  if (status == 0) {
    wb_solve(ex, m, s.tiles);
    if (ex.for_each_any(nr, [&](index_t e) { return !wb_finite(m.X[e]); }))
      status = kInfoOverflow;
  }
  if (status != 0) ex.for_each(nr, [&](index_t e) { m.X[e] = T(0); });
  ex.single([&] {
    *info = status;
    *damping_used = used;
  });
}

#if !defined(__CUDA_ARCH__)
// The execution policy of the CPU kernel and the ctest: every "thread" in turn.
struct SerialExec {
  template <typename F>
  void for_each(index_t count, F&& f) {
    for (index_t e = 0; e < count; ++e) f(e);
  }
  template <typename F>
  bool for_each_any(index_t count, F&& f) {
    bool any = false;
    for (index_t e = 0; e < count; ++e) any = f(e) || any;
    return any;
  }
  template <typename F, typename G>
  int column_steps(int steps, F&& f, index_t count, G&& g) {
    for (index_t e = 0; e < count; ++e) g(e);
    for (int c = 0; c < steps; ++c) {
      bool ok = true;
      for (int lane = 0; lane < 32; ++lane) ok = f(c, lane) && ok;
      if (!ok) return c;
    }
    return -1;
  }
  template <typename F>
  double uniform(F&& f) { return f(); }
  template <typename F>
  void single(F&& f) { f(); }
};
#endif

}  // namespace core
#if defined(__CUDACC__) || defined(LOWRANK_WITH_CUDA)
// The CUDA kernel's launcher (cuda/woodbury_solve.cu; its caller: woodbury_solve.cpp):
// raw pointers, sizes and strides in elements.
struct WoodburyLaunch {
  const void* K;  // b x n x n, strides k0, k1, k2; only the lower triangle (k <= i) is read
  index_t k0, k1, k2;
  const void* damping;  // b values, stride d0
  index_t d0;
  const void* R;  // b x n x r, strides r0, r1, r2
  index_t r0, r1, r2;
  index_t b, n, r;
  double jitter;
  int max_tries;
  bool fp64;           // float64 when true, else float32 (every tensor argument alike)
  void* X;             // b x n x r contiguous
  int* info;           // b
  void* damping_used;  // b
  void* workspace;     // woodbury_workspace_bytes(...) bytes (nullptr when that is 0)
};

// Global-memory workspace the launch needs: 0 when a member's tiles fit in the shared memory of
// the current device, else b times their size.
cudaError_t woodbury_workspace_bytes(index_t b, index_t n, bool fp64, index_t* bytes);

cudaError_t launch_woodbury_solve(const WoodburyLaunch& args, cudaStream_t stream);
#endif

}  // namespace lowrank
