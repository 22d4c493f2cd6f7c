"""The subspace family's Triton kernels compile for a GPU (sm_90, PTX through Triton's own
ptxas down to a cubin) — no GPU needed, so a kernel that only the interpreter has run cannot
hide a compile-time error (constexpr rules, layouts, dtypes) until a GPU turns up. Written-out
signatures and constexprs for each kernel, and the launches the launchers make for fp32, fp16
and bf16 inputs (recorded, python_tests/triton_compile.py). Each family compiles in
a child process without TRITON_INTERPRET."""
from pathlib import Path

import pytest
import torch

import triton_compile
from triton_compile import explicit

MODULES = triton_compile.COVERAGE[Path(__file__).name]


def _fwht():
    from lowrank_kernels.triton import fwht

    launches = [explicit(fwht._fwht_kernel, {"x": "*fp32", "y": "*fp32", "inner": "i64"},
                         {"N": n, "LOG_N": n.bit_length() - 1}, num_warps=8 if n >= 2048 else 4)
                for n in (2, 8, 1024, fwht.MAX_FIBER)]

    def drive():
        # One fiber (inner = 1) and a transform of two factors (2 · MAX_FIBER: the second
        # launch strided), in each dtype the op's Triton backend takes.
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for n in (8, 2 * fwht.MAX_FIBER):
                fwht.fwht(torch.zeros(3, n, dtype=dtype))

    return launches + triton_compile.record([fwht], drive)


def _subspace_project():
    from lowrank_kernels.triton.subspace_project import (_subspace_expand_kernel,
                                                         _subspace_project_kernel)
    launches = []
    for dt in ("fp32", "fp16", "bf16"):
        launches.append(explicit(
            _subspace_project_kernel,
            {"P": f"*{dt}", "sp0": "i64", "sp1": "i64", "g": f"*{dt}", "sg": "i64",
             "partial": "*fp32", "D": "i64", "K": "i32", "rows_per_program": "i64"},
            {"BLOCK_D": 64, "BLOCK_K": 64}))
        launches.append(explicit(
            _subspace_expand_kernel,
            {"P": f"*{dt}", "sp0": "i64", "sp1": "i64", "alpha": "*fp32", "sa": "i64",
             "base": f"*{dt}", "sb": "i64", "out": f"*{dt}", "D": "i64", "K": "i32"},
            {"HAS_BASE": True, "BLOCK_D": 64, "BLOCK_K": 64}))
    from lowrank_kernels.triton import subspace_project

    def drive():
        # Narrow (k = 5: 8-wide tiles) and wide (k = 100) bases, with and without base.
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for k, with_base in ((5, True), (100, False)):
                P = torch.zeros(300, k, dtype=dtype)
                subspace_project.subspace_project(P, torch.zeros(300, dtype=dtype))
                subspace_project.subspace_expand(P, torch.zeros(k),
                                                 torch.zeros(300, dtype=dtype) if with_base
                                                 else None)

    return launches + triton_compile.record([subspace_project], drive)


def _random_subspace():
    from lowrank_kernels.triton.random_subspace import (_random_expand_kernel,
                                                        _random_project_kernel)
    launches = []
    for rademacher in (False, True):
        launches.append(explicit(
            _random_expand_kernel,
            {"alpha": "*fp32", "sa": "i64", "base": "*fp32", "sb": "i64", "out": "*fp32",
             "D": "i64", "d": "i32", "seed": "i64", "scale": "fp32"},
            {"HAS_BASE": True, "RADEMACHER": rademacher, "BLOCK_D": 64, "BLOCK_C": 64}))
        launches.append(explicit(
            _random_project_kernel,
            {"g": "*fp32", "sg": "i64", "partial": "*fp32", "D": "i64", "d": "i32",
             "rows_per_program": "i64", "seed": "i64"},
            {"RADEMACHER": rademacher, "BLOCK_D": 64, "BLOCK_C": 64}))
    from lowrank_kernels.triton import random_subspace

    def drive():
        # fp32: d = 3 (the narrowest tile: one column group), 13 and 100 (the widest); 32-bit
        # and 64-bit seeds; with and without base. fp16 and bf16 g / base: the widest tile.
        configs = [(3, 7, False, True), (13, 2 ** 40, True, False), (100, 12345, True, True)]
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for d, seed, rademacher, with_base in (configs if dtype == torch.float32
                                                   else configs[-1:]):
                random_subspace.random_subspace_project(torch.zeros(300, dtype=dtype), seed, d,
                                                        0.1, rademacher)
                random_subspace.random_subspace_expand(
                    torch.zeros(d), seed, 300, 0.1, rademacher,
                    torch.zeros(300, dtype=dtype) if with_base else None)

    return launches + triton_compile.record([random_subspace], drive)


CASES = {"fwht": _fwht, "subspace_project": _subspace_project,
         "random_subspace": _random_subspace}


@pytest.mark.parametrize("family", sorted(CASES))
def test_triton_kernels_compile_for_sm90(family):
    compiled = triton_compile.compile_in_child(__file__, family)
    assert compiled == triton_compile.expected_kernels([family])


def test_families_are_the_covered_modules():
    assert sorted(CASES) == sorted(MODULES)


if __name__ == "__main__":
    triton_compile.main(CASES)
