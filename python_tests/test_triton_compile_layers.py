"""The Triton kernels of the linear/conv2d Gram, weighted-sum and projection ops compile for a
GPU (sm_90, down to a cubin) in the configurations their launchers use — the interpreter runs
them on CPU but never type-checks them as the compiler does. No GPU is needed: each launcher
runs with a recorder in place of its kernels, and every distinct launch is compiled — in a
child process without TRITON_INTERPRET, where @triton.jit gives compilable functions
(python_tests/triton_compile.py)."""
from pathlib import Path

import torch

import triton_compile

MODULES = triton_compile.COVERAGE[Path(__file__).name]


def _launches(dtype):
    from lowrank_kernels.triton import (gram_conv2d, gram_linear, project_conv2d, project_linear,
                                        weighted_sum_conv2d, weighted_sum_linear)

    def drive():
        g = torch.Generator().manual_seed(0)
        # The token-pair reductions (T = 1: rows are samples; T = 3: SB samples a block;
        # T = 70: one sample a block) with symmetric / cross / diagonal / cross diagonal.
        for T, kwargs in ((1, {}), (3, {"cross": True}), (70, {"diagonal": True}),
                          (70, {"diagonal": True, "cross": True})):
            A = torch.randn(3, T, 7, generator=g).to(dtype)
            E = torch.randn(3, T, 5, generator=g).to(dtype)
            second = {"A2": A, "E2": E} if kwargs.pop("cross", False) else {}
            gram_linear.gram_linear(A, E, True, **second, **kwargs)
        for kwargs in ({}, {"A2": A, "E2": E}, {"diagonal": True},
                       {"A2": A, "E2": E, "diagonal": True}):
            gram_linear.gram_linear(A, E, True, route="per_sample", **kwargs)
        # Large layers: the widest tiles and 8 warps.
        A_big = torch.randn(2, 3, 200, generator=g).to(dtype)
        E_big = torch.randn(2, 3, 130, generator=g).to(dtype)
        gram_linear.gram_linear(A_big, E_big, True, route="per_sample")
        weighted_sum_linear.weighted_sum_linear(A_big, E_big, torch.randn(2, 2), True)
        project_linear.project_linear(A_big[:1].expand(50, 3, 200),
                                      E_big[:1].expand(50, 3, 130), torch.randn(130, 200))
        X = torch.randn(2, 4, 6, 6, generator=g).to(dtype)
        E = torch.randn(2, 6, 3, 6, generator=g).to(dtype)
        geometry = ((3, 2), (2, 1), (1, 0), (1, 2), 2)
        for route in ("token_pair", "per_sample"):
            gram_conv2d.gram_conv2d(X, E, *geometry, True, route=route)
        weighted_sum_conv2d.weighted_sum_conv2d(X, E, torch.randn(2, 3), *geometry, True)
        weighted_sum_linear.weighted_sum_linear(A, A[..., :5], torch.randn(3), False)
        project_conv2d.project_conv2d(X, E, torch.randn(6, 2, 3, 2), torch.randn(6),
                                      *geometry[1:])
        project_linear.project_linear(A, A[..., :5], torch.randn(5, 7))

    return triton_compile.record([gram_linear, weighted_sum_linear, project_linear], drive)


CASES = {"bfloat16": lambda: _launches(torch.bfloat16)}


def test_kernels_compile_for_sm90():
    """bf16: the dtype whose paths the interpreter cannot run at all (fp32 and fp16 kernels run
    under it in the other tests); about 15 s of CPU on a cold Triton cache."""
    compiled = triton_compile.compile_in_child(__file__, "bfloat16")
    assert compiled == ["gram_linear:_gram_token_pair_kernel",
                        "gram_linear:_gram_workspace_kernel",
                        "gram_linear:_per_sample_gradient_kernel",
                        "project_linear:_project_linear_kernel",
                        "weighted_sum_linear:_weighted_sum_linear_kernel"]
    assert compiled == triton_compile.expected_kernels(MODULES)


if __name__ == "__main__":
    triton_compile.main(CASES)
