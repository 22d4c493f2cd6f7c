// Argument checks and batching of lowrank_kernels::woodbury_solve, shared by its CPU kernel
// and its CUDA glue: every error names the argument and what was expected (the same messages
// as the Python reference's checks).
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

namespace lowrank {

// The op's arguments as the kernels take them: K (b, n, n), damping (b) in K's dtype on K's
// device, R (b, n, r); `vector_rhs` / `batched` say how to give back X, info, damping_used.
struct WoodburyArgs {
  at::Tensor K, damping, R;
  double jitter;
  int max_tries;
  bool batched, vector_rhs;
};

inline WoodburyArgs woodbury_args(const at::Tensor& K, const at::Tensor& damping,
                                  const at::Tensor& R, std::optional<double> jitter,
                                  int64_t max_tries) {
  constexpr const char* kOp = "woodbury_solve";
  TORCH_CHECK_VALUE(K.dim() == 2 || K.dim() == 3, kOp, ": K must be a 2 or 3-D tensor (b x n x n or "
                    "n x n: the symmetric matrices), got shape ", K.sizes());
  TORCH_CHECK_TYPE(K.scalar_type() == at::kFloat || K.scalar_type() == at::kDouble, kOp,
                   ": K must have a floating dtype (float32, float64), got ", K.scalar_type());
  TORCH_CHECK_VALUE(K.size(-1) == K.size(-2), kOp, ": K must be square in its last two dims, "
                    "got shape ", K.sizes());
  const bool batched = K.dim() == 3;
  TORCH_CHECK_VALUE(batched ? (R.dim() == 3 || R.dim() == 2) : (R.dim() == 2 || R.dim() == 1),
                    kOp, ": R must be a ", batched ? "3 or 2" : "2 or 1", "-D tensor (",
                    batched ? "b x n x r or b x n" : "n x r or n",
                    ": the right-hand sides), got shape ", R.sizes());
  TORCH_CHECK_TYPE(R.scalar_type() == at::kFloat || R.scalar_type() == at::kDouble, kOp,
                   ": R must have a floating dtype (float32, float64), got ", R.scalar_type());
  TORCH_CHECK_VALUE(R.device() == K.device(), kOp, ": K and R must have the same device, got ",
                    K.device(), " and ", R.device());
  TORCH_CHECK_VALUE(R.scalar_type() == K.scalar_type(), kOp,
                    ": K and R must have the same dtype, got ", K.scalar_type(), " and ",
                    R.scalar_type());
  const int64_t b = batched ? K.size(0) : 1, n = K.size(-1);
  if (batched)
    TORCH_CHECK_VALUE(R.size(0) == b, kOp, ": K and R must have the same batch size b (dim 0), "
                      "got ", b, " and ", R.size(0));
  const int64_t rows = batched ? R.size(1) : R.size(0);
  TORCH_CHECK_VALUE(rows == n, kOp, ": K and R must have the same size n (K's last dim, R's "
                    "rows), got ", n, " and ", rows);
  TORCH_CHECK_VALUE(damping.dim() <= 1, kOp, ": damping must be a 0 or 1-D tensor (a float, "
                    "0-d or (b,) tensor), got shape ", damping.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(damping.scalar_type()), kOp,
                   ": damping must have a floating dtype, got ", damping.scalar_type());
  const bool cpu_scalar = damping.dim() == 0 && damping.device().is_cpu();
  TORCH_CHECK_VALUE(cpu_scalar || damping.device() == K.device(), kOp,
                    ": K and damping must have the same device, got ", K.device(), " and ",
                    damping.device());
  TORCH_CHECK_VALUE(damping.dim() == 0 || damping.size(0) == b, kOp,
                    ": damping must have one value per batch member (", b, "), got shape ",
                    damping.sizes());
  const double jit = jitter.has_value() ? *jitter
                                        : (K.scalar_type() == at::kDouble ? 1e-12 : 1e-6);
  TORCH_CHECK_VALUE(jit >= 0.0 && jit < 1e300, kOp, ": jitter must be finite and >= 0, got ",
                    jit);
  TORCH_CHECK_VALUE(max_tries >= 0 && max_tries <= 64, kOp,
                    ": max_tries must be in [0, 64], got ", max_tries);
  at::Tensor Kb = batched ? K : K.unsqueeze(0);
  const bool vector_rhs = R.dim() == K.dim() - 1;
  at::Tensor Rb = vector_rhs ? R.unsqueeze(-1) : R;
  if (!batched) Rb = Rb.unsqueeze(0);
  at::Tensor lam;
  if (cpu_scalar && !K.device().is_cpu()) {  // a CPU scalar: filled on K's device, no copy
    lam = at::full({b}, damping.item<double>(), K.options());
  } else {
    lam = damping.to(K.scalar_type());
    lam = lam.dim() == 0 ? lam.expand({b}) : lam;
  }
  // A value the kernels cannot use (negative, NaN, Inf) gives that member info = -3 there:
  // checked on the device, no host sync.
  return {Kb, lam, Rb, jit, static_cast<int>(max_tries), batched, vector_rhs};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> woodbury_unbatch(
    const WoodburyArgs& a, at::Tensor X, at::Tensor info, at::Tensor used) {
  if (a.vector_rhs) X = X.squeeze(-1);
  if (!a.batched) return {X[0], info[0], used[0]};
  return {X, info, used};
}

}  // namespace lowrank
