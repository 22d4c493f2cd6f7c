"""Per-call overhead of the op router: a tiny gram_linear (B = 8, d_in = d_out = 4, float32)
and a tiny woodbury_solve (n = 8, r = 2, float64) through the public API (argument checks,
backend choice, the result's non-finite check) against the native op they end up running,
called directly. One round is CALLS back-to-back calls (synchronized once at the end), so the
overhead per call is (ours - native) / CALLS; it is stored as extra info per_call_us.
"""
import pytest
import torch
from common import DEVICE, measure

import lowrank_kernels as lk
from lowrank_kernels import _capabilities as caps

CALLS = 200


def _needs_native():
    if not caps.native_built() or (DEVICE == "cuda" and not caps.native_has_cuda()):
        pytest.skip("the native extension (with CUDA kernels on a GPU) is not built")


def _loop(fn):
    def run():
        for _ in range(CALLS):
            out = fn()
        return out
    return run


def _measure(benchmark, fn, op, shape, provider, baseline):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny op: what is measured is Python and dispatch, not BLAS
    try:
        measure(benchmark, _loop(fn), op=f"dispatch {op}", shape=f"{shape}, {CALLS} calls",
                provider=provider, baseline=baseline, dtype="float32")
    finally:
        torch.set_num_threads(threads)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["per_call_us"] = round(stats.stats.median / CALLS * 1e6, 2)


def _gram_inputs():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(8, 4, generator=g).to(DEVICE)
    E = torch.randn(8, 4, generator=g).to(DEVICE)
    return A, E


@pytest.mark.parametrize("provider", ["ours", "native"])
def test_dispatch_gram_linear(benchmark, provider):
    _needs_native()
    A, E = _gram_inputs()
    if provider == "ours":
        fn, name = (lambda: lk.gram_linear(A, E, backend="native")), "ours (lk.gram_linear)"
    else:
        fn, name = (lambda: torch.ops.lowrank_native.gram_linear(A, E, False)), "native op direct"
    torch.testing.assert_close(fn(), torch.ops.lowrank_native.gram_linear(A, E, False))
    _measure(benchmark, fn, "gram_linear", "B=8 d=4x4 float32", name, provider != "ours")


def _woodbury_inputs():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(8, 8, generator=g, dtype=torch.float64)
    K = (G @ G.T / 8 + torch.eye(8, dtype=torch.float64)).to(DEVICE)
    R = torch.randn(8, 2, generator=g, dtype=torch.float64).to(DEVICE)
    return K, R


@pytest.mark.parametrize("provider", ["ours", "native"])
def test_dispatch_woodbury_solve(benchmark, provider):
    _needs_native()
    K, R = _woodbury_inputs()
    if provider == "ours":
        fn = lambda: lk.woodbury_solve(K, 1e-3, R, backend="native")  # noqa: E731
        name = "ours (lk.woodbury_solve)"
    else:
        Kb, Rb = K[None], R[None]
        lam = torch.full((1,), 1e-3, dtype=torch.float64, device=DEVICE)
        fn = lambda: torch.ops.lowrank_native.woodbury_solve(Kb, lam, Rb, 1e-12, 4)  # noqa: E731
        name = "native op direct"
    X = fn()[0]
    torch.testing.assert_close(X.reshape(R.shape), lk.woodbury_solve(K, 1e-3, R).X)
    _measure(benchmark, fn, "woodbury_solve", "n=8 r=2 float64", name, provider != "ours")
