// ctest of the host/device core of woodbury_solve (torch-free): the whole per-member routine
// run with SerialExec — the schedule every CUDA thread follows — against a long-double dense
// Cholesky solve, at sizes that cross tile boundaries; the failure codes (indefinite leading
// minor, NaN input, jitter ladder); that the upper triangle is never read; the tile
// bookkeeping; and that the schedule is free of data races: running the items of every phase
// (and the lanes of every column step) in random orders, as the CUDA threads may, gives the
// same bits.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "lowrank/woodbury_core.h"
#include "expect.h"

namespace core = lowrank::core;
using lowrank::index_t;


// An SPD matrix G Gᵀ/n + shift·I (G n×n normal), upper triangle poisoned with NaN.
static std::vector<double> spd(int n, double shift, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  std::vector<double> G(n * n), K(n * n);
  for (auto& x : G) x = normal(rng);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j <= i; ++j) {
      double s = 0;
      for (int k = 0; k < n; ++k) s += G[i * n + k] * G[j * n + k];
      K[i * n + j] = s / n + (i == j ? shift : 0.0);
      if (j < i) K[j * n + i] = std::numeric_limits<double>::quiet_NaN();
    }
  return K;
}

// Dense solve of (tril(K) + tril(K,-1)ᵀ + lam I) X = R in long double (Cholesky).
static std::vector<long double> dense_solve(const std::vector<double>& K, int n, double lam,
                                            const std::vector<double>& R, int r) {
  std::vector<long double> L(n * n, 0.0L), X(R.begin(), R.end());
  for (int j = 0; j < n; ++j) {
    long double d = K[j * n + j] + lam;
    for (int k = 0; k < j; ++k) d -= L[j * n + k] * L[j * n + k];
    L[j * n + j] = std::sqrt(d);
    for (int i = j + 1; i < n; ++i) {
      long double s = K[i * n + j];
      for (int k = 0; k < j; ++k) s -= L[i * n + k] * L[j * n + k];
      L[i * n + j] = s / L[j * n + j];
    }
  }
  for (int q = 0; q < r; ++q) {
    for (int i = 0; i < n; ++i) {
      long double s = X[i * r + q];
      for (int k = 0; k < i; ++k) s -= L[i * n + k] * X[k * r + q];
      X[i * r + q] = s / L[i * n + i];
    }
    for (int i = n - 1; i >= 0; --i) {
      long double s = X[i * r + q];
      for (int k = i + 1; k < n; ++k) s -= L[k * n + i] * X[k * r + q];
      X[i * r + q] = s / L[i * n + i];
    }
  }
  return X;
}

// Items of each phase, and lanes of each column step, in a fresh random order: a phase whose
// result depends on the order of its items would be a data race in the CUDA kernel.
struct PermutedExec {
  std::mt19937 rng{12345};
  std::vector<lowrank::index_t> order(lowrank::index_t count) {
    std::vector<lowrank::index_t> o(count);
    std::iota(o.begin(), o.end(), 0);
    std::shuffle(o.begin(), o.end(), rng);
    return o;
  }
  template <typename F>
  void for_each(lowrank::index_t count, F&& f) {
    for (auto e : order(count)) f(e);
  }
  template <typename F>
  bool for_each_any(lowrank::index_t count, F&& f) {
    bool any = false;
    for (auto e : order(count)) any = f(e) || any;
    return any;
  }
  // The steps (each a unit: the warp is in lock-step) interleaved at random with g's items.
  template <typename F, typename G>
  int column_steps(int steps, F&& f, lowrank::index_t count, G&& g) {
    auto items = order(count);
    std::vector<int> sequence(items.size(), 1);
    sequence.resize(items.size() + steps, 0);  // 1: an item of g, 0: a column step
    std::shuffle(sequence.begin(), sequence.end(), rng);
    size_t next_item = 0;
    int c = 0, failed = -1;
    for (int kind : sequence) {
      if (kind == 1) {
        g(items[next_item++]);
      } else if (failed < 0 && c < steps) {
        bool ok = true;
        for (auto lane : order(32)) ok = f(c, static_cast<int>(lane)) && ok;
        if (!ok) failed = c;
        ++c;
      }
    }
    return failed;
  }
  template <typename F>
  double uniform(F&& f) { return f(); }
  template <typename F>
  void single(F&& f) { f(); }
};

template <typename T>
struct Run {
  std::vector<T> X;
  int info;
  T used;
};

template <typename T, typename Exec = core::SerialExec>
static Run<T> run_member(const std::vector<double>& K64, int n, double lam,
                         const std::vector<double>& R64, int r, double jitter, int tries) {
  std::vector<T> K(K64.begin(), K64.end()), R(R64.begin(), R64.end());
  // Scratch starts as NaN: anything read before it is written shows up in the result.
  std::vector<T> tiles(core::wb_storage_elems(n), std::numeric_limits<T>::quiet_NaN());
  std::vector<T> ldiag(core::kWbTile), linv(core::kWbTile);
  Run<T> out{std::vector<T>(static_cast<size_t>(n) * r, T(-7)), 99, T(-1)};
  core::WbMember<T> m{K.data(), n, 1, R.data(), r, 1, out.X.data(), n, r, static_cast<T>(lam),
                      jitter, tries};
  Exec ex;
  core::woodbury_solve_member(ex, m, core::WbScratch<T>{tiles.data(), ldiag.data(), linv.data()},
                              &out.info, &out.used);
  return out;
}

static std::vector<double> normal_rhs(int n, int r, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  std::vector<double> R(static_cast<size_t>(n) * r);
  for (auto& x : R) x = normal(rng);
  return R;
}

// ‖x − x̂‖/‖x‖ ≤ 20·n·u·κ-ish: with the shift ≥ 0.5 below, κ ≤ (λmax + lam)/0.5 ≈ 10.
template <typename T>
static void check_solves(int n, int r, double eps) {
  const double lam = 0.25;
  auto K = spd(n, 0.25, 1000 + n);
  auto R = normal_rhs(n, r, 2000 + n);
  auto exact = dense_solve(K, n, lam, R, r);
  auto out = run_member<T>(K, n, lam, R, r, 1e-6, 3);
  EXPECT(out.info == 0, "n=%d info=%d", n, out.info);
  EXPECT(out.used == static_cast<T>(lam), "n=%d damping_used changed", n);
  long double err = 0, norm = 0;
  for (size_t e = 0; e < exact.size(); ++e) {
    err += (out.X[e] - exact[e]) * (out.X[e] - exact[e]);
    norm += exact[e] * exact[e];
  }
  const double rel = std::sqrt(static_cast<double>(err / norm));
  EXPECT(rel <= 200.0 * n * eps, "n=%d r=%d rel err %.3e > %.3e", n, r, rel, 200.0 * n * eps);
}

static void check_failures() {
  const int n = 37, r = 3;
  auto R = normal_rhs(n, r, 5);
  // Leading minor of order 21 indefinite (a huge negative diagonal entry at row 20), far out
  // of reach of the jitter ladder: info = 21 at every rung, X = 0.
  auto K = spd(n, 0.5, 6);
  K[20 * n + 20] = -1e6;
  auto out = run_member<double>(K, n, 0.0, R, r, 1e-6, 4);
  EXPECT(out.info == 21, "indefinite info=%d, want 21", out.info);
  for (double x : out.X) EXPECT(x == 0.0, "failed member X must be zero");
  // Mildly indefinite (λ_min of K slightly negative): a rung of the ladder fixes it.
  K = spd(n, 0.0, 7);
  for (int i = 0; i < n; ++i) K[i * n + i] -= 1e-3;  // G Gᵀ/n has λ_min ≈ 0 (n×n Gram)
  auto mild = run_member<double>(K, n, 0.0, R, r, 1e-4, 4);
  EXPECT(mild.info == 0, "mild info=%d", mild.info);
  double s = core::wb_diag_abs_mean(K.data(), n, n + 1);
  bool is_rung = false;
  for (int p = 0; p < 4; ++p) is_rung |= mild.used == core::wb_jitter_shift<double>(1e-4, p, s);
  EXPECT(is_rung && mild.used > 0.0, "damping_used %.3e is not a rung of the ladder", mild.used);
  auto exact = dense_solve(K, n, mild.used, R, r);
  for (size_t e = 0; e < exact.size(); ++e)
    EXPECT(std::fabs(mild.X[e] - static_cast<double>(exact[e])) <=
               1e-6 * (1.0 + std::fabs(static_cast<double>(exact[e]))),
           "jittered solve wrong at %zu", e);
  // No ladder (max_tries = 0): the failure stands, with the order of the minor.
  auto nolad = run_member<double>(K, n, 0.0, R, r, 1e-4, 0);
  EXPECT(nolad.info > 0 && nolad.info <= n && nolad.used == 0.0, "no ladder info=%d",
         nolad.info);
  // NaN in the lower triangle / Inf in R: kInfoNonFinite, zeros, damping unchanged.
  K = spd(n, 0.5, 8);
  K[30 * n + 2] = std::numeric_limits<double>::quiet_NaN();
  out = run_member<double>(K, n, 0.5, R, r, 1e-6, 4);
  EXPECT(out.info == core::kInfoNonFinite && out.used == 0.5, "NaN K info=%d", out.info);
  for (double x : out.X) EXPECT(x == 0.0, "NaN member X must be zero");
  K = spd(n, 0.5, 8);
  auto Rinf = R;
  Rinf[5] = std::numeric_limits<double>::infinity();
  out = run_member<double>(K, n, 0.5, Rinf, r, 1e-6, 4);
  EXPECT(out.info == core::kInfoNonFinite, "Inf R info=%d", out.info);
  // Overflow of the solution in float: kInfoOverflow, zeros.
  std::vector<double> tiny(n * n, std::numeric_limits<double>::quiet_NaN());
  for (int i = 0; i < n; ++i)
    for (int j = 0; j <= i; ++j) tiny[i * n + j] = i == j ? 1e-30 : 0.0;
  std::vector<double> big(n * r, 1e30);
  auto of = run_member<float>(tiny, n, 0.0, big, r, 1e-6, 0);
  EXPECT(of.info == core::kInfoOverflow, "overflow info=%d", of.info);
  for (float x : of.X) EXPECT(x == 0.0f, "overflowed member X must be zero");
}

static void check_bookkeeping() {
  for (index_t t = 0; t < 5000; ++t) {
    index_t I, J;
    core::wb_tri_unrank(t, I, J);
    EXPECT(J >= 0 && J <= I && I * (I + 1) / 2 + J == t, "unrank %lld", (long long)t);
  }
  EXPECT(core::wb_tiles(1) == 1 && core::wb_tiles(16) == 1 && core::wb_tiles(17) == 2, "tiles");
  EXPECT(core::wb_storage_elems(33) == 6 * core::kWbTileElems, "storage");
  EXPECT(!core::wb_finite(std::numeric_limits<float>::infinity()) &&
             !core::wb_finite(std::nan("")) && core::wb_finite(1e300),
         "wb_finite");
}

template <typename T>
static bool same_bits(const Run<T>& a, const Run<T>& b) {
  return a.info == b.info && std::memcmp(&a.used, &b.used, sizeof(T)) == 0 &&
         std::memcmp(a.X.data(), b.X.data(), a.X.size() * sizeof(T)) == 0;
}

static void check_race_free() {
  for (int n : {5, 16, 33, 70}) {
    auto K = spd(n, 0.1, 300 + n);
    auto R = normal_rhs(n, 3, 400 + n);
    EXPECT(same_bits(run_member<float>(K, n, 0.01, R, 3, 1e-6, 4),
                     run_member<float, PermutedExec>(K, n, 0.01, R, 3, 1e-6, 4)),
           "fp32 n=%d: the result depends on the order of the items", n);
    EXPECT(same_bits(run_member<double>(K, n, 0.01, R, 3, 1e-6, 4),
                     run_member<double, PermutedExec>(K, n, 0.01, R, 3, 1e-6, 4)),
           "fp64 n=%d: the result depends on the order of the items", n);
    K[(n - 1) * n + 1] = -0.9;  // indefinite: the ladder runs, in any order alike
    K[1 * n + 1] = 0.01;
    EXPECT(same_bits(run_member<double>(K, n, 0.0, R, 3, 1e-3, 4),
                     run_member<double, PermutedExec>(K, n, 0.0, R, 3, 1e-3, 4)),
           "fp64 n=%d indefinite: the result depends on the order of the items", n);
  }
}

int main() {
  check_bookkeeping();
  for (int n : {1, 7, 16, 17, 33, 64, 130}) {
    for (int r : {1, 5}) {
      check_solves<double>(n, r, std::numeric_limits<double>::epsilon() / 2);
      check_solves<float>(n, r, std::numeric_limits<float>::epsilon() / 2);
    }
  }
  check_failures();
  check_race_free();
  if (failures == 0) std::printf("test_woodbury_core: all passed\n");
  return failures == 0 ? 0 : 1;
}
