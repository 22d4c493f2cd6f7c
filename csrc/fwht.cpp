// lowrank_kernels::fwht's CPU kernel, registered on the public schema (declared in
// lowrank_kernels/ops/fwht.py): y = H_n x along the last dimension, row by row in place in a
// float32 (float64 for float64) copy, the log₂ n radix-2 stages h = 1, 2, 4, … taken two at a
// time (a radix-4 pass: stage h then stage 2h on x[j], x[j+h], x[j+2h], x[j+3h]) — the same
// additions in the same order as the reference, so the same bits, with a row (4 KiB at
// n = 1024) read and written once per two stages while it sits in cache. Rows in parallel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "lowrank/hd.h"
#include "lowrank/py_checks.h"

namespace lowrank {
namespace {

template <typename S>
void fwht_row(S* y, index_t n) {
  index_t h = 1;
  for (; 4 * h <= n; h *= 4)
    for (index_t base = 0; base < n; base += 4 * h) {
      S* a = y + base;
      S* b = a + h;
      S* c = b + h;
      S* d = c + h;
      for (index_t j = 0; j < h; ++j) {
        const S s0 = a[j] + b[j], s1 = a[j] - b[j], s2 = c[j] + d[j], s3 = c[j] - d[j];
        a[j] = s0 + s2, b[j] = s1 + s3, c[j] = s0 - s2, d[j] = s1 - s3;
      }
    }
  if (h < n) {  // an odd number of stages: the last one, h = n / 2
    S* a = y;
    S* b = y + h;
    for (index_t j = 0; j < h; ++j) {
      const S s = a[j] + b[j], t = a[j] - b[j];
      a[j] = s, b[j] = t;
    }
  }
}

at::Tensor fwht_cpu(const at::Tensor& x) {
  constexpr const char* op = "fwht";
  checks::check_float(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least 1 dimension (the transform runs "
                    "along the last), got a 0-D tensor");
  const index_t n = x.size(-1);
  TORCH_CHECK_VALUE(n >= 1 && (n & (n - 1)) == 0, op,
                    ": x's last dimension must be a power of two, got ", n);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor y = x.to(acc).contiguous();
  if (y.is_same(x)) y = y.clone();  // never write x
  const index_t rows = n ? y.numel() / n : 0;
  AT_DISPATCH_FLOATING_TYPES(acc, op, [&] {
    scalar_t* p = y.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<index_t>(1, (1 << 15) / n), [&](index_t lo, index_t hi) {
      for (index_t r = lo; r < hi; ++r) fwht_row(p + r * n, n);
    });
  });
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_kernels, CPU, m) { m.impl("fwht", &fwht_cpu); }

}  // namespace lowrank
