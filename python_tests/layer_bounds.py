"""A priori error bounds for the weighted-sum and projection ops (Higham §3.1): an fp32
result of n roundings of sums of products is within γ_n·M of the exact value, M the same
computation on absolute values (run by the float64 reference on |inputs|)."""
import torch
from numerics import assert_within, gamma

# Unit roundoff of c ⊙ E rounded to the input dtype before a low-precision GEMM.
ROUNDING = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def exact_and_bound(run, tensors, args, n, u_extra=0.0):
    """[(exact, bound)] per output of run(*tensors, *args) in float64 on the (already rounded)
    inputs; bound = (γ_n + u_extra)·M. tensors may hold None (optional inputs)."""
    f64 = [None if t is None else t.double().cpu() for t in tensors]
    exact = run(*f64, *args)
    magnitude = run(*(None if t is None else t.abs() for t in f64), *args)
    if not isinstance(exact, tuple):
        exact, magnitude = (exact,), (magnitude,)
    coeff = gamma(n) + u_extra
    return [(x, None if x is None else coeff * mx + 1e-30) for x, mx in zip(exact, magnitude)]


def check_result(result, expected, what):
    """Each output fp32, of the exact shape, within its bound; None where the exact is None."""
    result = result if isinstance(result, tuple) else (result,)
    for i, (out, (exact, bound)) in enumerate(zip(result, expected)):
        if exact is None:
            assert out is None, f"{what}: output {i} must be None"
            continue
        assert out.dtype == torch.float32 and out.shape == exact.shape, \
            f"{what}: output {i} {out.dtype} {tuple(out.shape)} against {tuple(exact.shape)}"
        assert_within(out.cpu(), exact, bound, f"{what} output {i}")
