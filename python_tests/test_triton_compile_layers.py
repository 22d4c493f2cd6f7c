"""The Triton kernels of the linear/conv2d Gram, weighted-sum and projection ops compile for a
GPU (sm_90, down to a cubin) in the configurations their launchers use — the interpreter runs
them on CPU but never type-checks them as the compiler does. No GPU is needed: each launcher
runs with a recorder in place of its kernels, and every distinct launch is compiled — in a
child process without TRITON_INTERPRET, where @triton.jit gives compilable functions."""
import os
import subprocess
import sys

import pytest
import torch
import triton

import lowrank_kernels.triton.gram_conv2d as gram_conv2d
import lowrank_kernels.triton.gram_linear as gram_linear
import lowrank_kernels.triton.project_conv2d as project_conv2d
import lowrank_kernels.triton.project_linear as project_linear
import lowrank_kernels.triton.weighted_sum_conv2d as weighted_sum_conv2d
import lowrank_kernels.triton.weighted_sum_linear as weighted_sum_linear

POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
KERNEL_MODULES = (gram_linear, weighted_sum_linear, project_linear)


class _Recorder:
    """kernel[grid](*args, **kwargs) records (kernel, signature, constexprs, options)."""

    def __init__(self, fn, launches):
        self.fn = fn
        self.launches = launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            names = self.fn.arg_names
            values = {**dict(zip(names, args)), **kwargs}
            signature, constexprs = {}, {}
            for index, (name, param) in enumerate(zip(names, self.fn.params)):
                value = values[name]
                if param.is_constexpr:
                    signature[name] = "constexpr"
                    constexprs[(index,)] = value
                elif isinstance(value, torch.Tensor):
                    signature[name] = POINTER[value.dtype]
                else:
                    signature[name] = "i64" if abs(int(value)) >= 2 ** 31 else "i32"
            options = {"num_warps": kwargs.get("num_warps", 4)}
            key = (self.fn.__name__, str(signature), str(constexprs), str(options))
            self.launches.setdefault(key, (self.fn, signature, constexprs, options))
        return launch


def _launches(dtype):
    launches = {}
    patch = pytest.MonkeyPatch()
    for module in KERNEL_MODULES:
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel"):
                patch.setattr(module, name, _Recorder(getattr(module, name), launches))
    try:
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
    finally:
        patch.undo()
    return list(launches.values())


def compile_all(dtype):
    """Compile every distinct launch for sm_90; the names of the kernels compiled."""
    launches = _launches(dtype)
    target = triton.backends.compiler.GPUTarget("cuda", 90, 32)
    for fn, signature, constexprs, options in launches:
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=target, options=options)
        assert compiled.asm.get("cubin"), f"{fn.__name__} {constexprs}: no cubin"
    return sorted({launch[0].__name__ for launch in launches})


def test_kernels_compile_for_sm90():
    """bf16: the dtype whose paths the interpreter cannot run at all (fp32 and fp16 kernels run
    under it in the other tests); about 15 s of CPU on a cold Triton cache."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__, "bfloat16"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split() == ["_gram_token_pair_kernel", "_gram_workspace_kernel",
                                   "_per_sample_gradient_kernel", "_project_linear_kernel",
                                   "_weighted_sum_linear_kernel"]


if __name__ == "__main__":
    print("\n".join(compile_all(getattr(torch, sys.argv[1]))))
