"""The subspace family's Triton kernels compile for a GPU (sm_90, PTX through Triton's own
ptxas) — no GPU needed, so a kernel that only the interpreter has run cannot hide a
compile-time error (constexpr rules, layouts, dtypes) until a GPU turns up."""
import os
import subprocess
import sys
import textwrap

import pytest

_PRELUDE = """
import os
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def compile_sm90(fn, signature, constexprs, **options):
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32), options=options)
    assert ".entry" in kernel.asm["ptx"]
"""

KERNELS = {
    "fwht": """
from lowrank_kernels.triton.fwht import MAX_FIBER, _fwht_kernel
for n in (2, 8, 1024, MAX_FIBER):
    compile_sm90(_fwht_kernel, {"x": "*fp32", "y": "*fp32", "inner": "i64"},
                 {"N": n, "LOG_N": n.bit_length() - 1}, num_warps=8 if n >= 2048 else 4)
""",
    "subspace_project": """
from lowrank_kernels.triton.subspace_project import (_subspace_expand_kernel,
                                                     _subspace_project_kernel)
for dt in ("fp32", "fp16", "bf16"):
    compile_sm90(_subspace_project_kernel,
                 {"P": f"*{dt}", "sp0": "i64", "sp1": "i64", "g": f"*{dt}", "sg": "i64",
                  "partial": "*fp32", "D": "i64", "K": "i32", "rows_per_program": "i64"},
                 {"BLOCK_D": 64, "BLOCK_K": 64})
    compile_sm90(_subspace_expand_kernel,
                 {"P": f"*{dt}", "sp0": "i64", "sp1": "i64", "alpha": "*fp32", "sa": "i64",
                  "base": f"*{dt}", "sb": "i64", "out": f"*{dt}", "D": "i64", "K": "i32"},
                 {"HAS_BASE": True, "BLOCK_D": 64, "BLOCK_K": 64})
""",
    "random_subspace": """
from lowrank_kernels.triton.random_subspace import (_random_expand_kernel,
                                                    _random_project_kernel)
for rademacher in (False, True):
    compile_sm90(_random_expand_kernel,
                 {"alpha": "*fp32", "sa": "i64", "base": "*fp32", "sb": "i64", "out": "*fp32",
                  "D": "i64", "d": "i32", "seed": "i64", "scale": "fp32"},
                 {"HAS_BASE": True, "RADEMACHER": rademacher, "BLOCK_D": 64, "BLOCK_C": 64})
    compile_sm90(_random_project_kernel,
                 {"g": "*fp32", "sg": "i64", "partial": "*fp32", "D": "i64", "d": "i32",
                  "rows_per_program": "i64", "seed": "i64"},
                 {"RADEMACHER": rademacher, "BLOCK_D": 64, "BLOCK_C": 64})
""",
}


@pytest.mark.parametrize("family", sorted(KERNELS))
def test_triton_kernels_compile_for_sm90(family, tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a fresh cache: compile, never reuse
    script = textwrap.dedent(_PRELUDE) + textwrap.dedent(KERNELS[family])
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
