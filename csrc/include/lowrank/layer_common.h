// Helpers of the layer ops' CPU kernels: a Conv2d's input tokens (im2col).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

namespace lowrank::layer {

// The geometry of one Conv2d call: kernel (kh, kw), stride, padding, dilation, output size.
struct Conv2dGeometry {
  int64_t kh, kw, sh, sw, ph, pw, dh, dw, H_out, W_out;
};

// X (B, C, H, W) -> U (B, C·kh·kw, H_out·W_out), as F.unfold (rows ordered (c, i, j) like a
// Conv2d weight, zero padding): U[b, (c, i, j), (y, x)] = X[b, c, y·sh − ph + i·dh, x·sw − pw + j·dw].
// Each output row segment is a copy of one input row segment (stride 1: memcpy) plus zeros,
// ~2.5–3x faster than F.unfold at the bench's 3×3 shapes. X in a floating dtype; U in X's.
inline at::Tensor im2col(const at::Tensor& X, const Conv2dGeometry& g) {
  const at::Tensor Xc = X.contiguous();
  const int64_t B = X.size(0), C = X.size(1), H = X.size(2), W = X.size(3);
  const int64_t T = g.H_out * g.W_out, taps = g.kh * g.kw;
  at::Tensor U = at::empty({B, C * taps, T}, X.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "im2col", [&] {
    const scalar_t* x = Xc.const_data_ptr<scalar_t>();
    scalar_t* u = U.data_ptr<scalar_t>();
    at::parallel_for(0, B * C, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t bc = lo; bc < hi; ++bc) {
        const scalar_t* plane = x + bc * H * W;
        for (int64_t i = 0; i < g.kh; ++i)
          for (int64_t j = 0; j < g.kw; ++j) {
            scalar_t* row = u + (bc * taps + i * g.kw + j) * T;
            // columns x in [x0, x1) read inside the input row: 0 <= x·sw + off < W
            const int64_t off = j * g.dw - g.pw;
            const int64_t x0 = std::min(g.W_out, off >= 0 ? 0 : (-off + g.sw - 1) / g.sw);
            const int64_t x1 = std::max(x0, std::min(g.W_out, W - off <= 0 ? 0
                                                     : (W - off + g.sw - 1) / g.sw));
            for (int64_t y = 0; y < g.H_out; ++y) {
              scalar_t* dst = row + y * g.W_out;
              const int64_t iy = y * g.sh - g.ph + i * g.dh;
              if (iy < 0 || iy >= H) {
                std::fill(dst, dst + g.W_out, scalar_t(0));
                continue;
              }
              const scalar_t* src = plane + iy * W + off;
              std::fill(dst, dst + x0, scalar_t(0));
              if (g.sw == 1) {
                std::memcpy(dst + x0, src + x0, (x1 - x0) * sizeof(scalar_t));
              } else {
                for (int64_t q = x0; q < x1; ++q) dst[q] = src[q * g.sw];
              }
              std::fill(dst + x1, dst + g.W_out, scalar_t(0));
            }
          }
      }
    });
  });
  return U;
}

}  // namespace lowrank::layer
