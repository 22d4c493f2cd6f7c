"""The Triton kernels of the embedding ops (Gram, weighted sum, projection) and of the sketch
ops (Ω tiles, M Ω with its split-K path; both through philox.omega_tile) compile for a GPU
(sm_90, down to a cubin) in the launch configurations their launchers use for fp32, fp16 and
bf16 inputs — the interpreter runs them on CPU but never type-checks them as the compiler
does. No GPU is needed (python_tests/triton_compile.py): each launcher runs with a recorder in
place of its kernel, and every distinct launch — specialized as Triton's JIT would on a GPU —
is compiled in a child process without TRITON_INTERPRET.

Also checked here: every kernel module of lowrank_kernels/triton is compiled by exactly one of
the three compile-test files (triton_compile.COVERAGE)."""
import contextlib
import types
from pathlib import Path

import pytest
import torch

import triton_compile

MODULES = triton_compile.COVERAGE[Path(__file__).name]
H100_SMS = 132  # an H100 SXM: sketch_matmul chooses its split-K factor from the SM count


@contextlib.contextmanager
def _tf32(allowed):
    """torch.backends.cuda.matmul.allow_tf32 (the launchers' fp32 PRECISION) for a block."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _embedding_calls(dtype, g):
    """Every branch of the embedding launchers' tile choices, padding, cross / diagonal Gram,
    1-D / 2-D weights and projections, odd and 16-aligned shapes, a non-contiguous E."""
    from lowrank_kernels.triton.gram_embedding import gram_embedding
    from lowrank_kernels.triton.project_embedding import project_embedding
    from lowrank_kernels.triton.weighted_sum_embedding import weighted_sum_embedding

    N = 11

    def tokens(B, T, d):
        return (torch.randint(N, (B, T), generator=g),
                torch.randn(B, T, d, generator=g).to(dtype))

    idx, E = tokens(3, 5, 7)
    idx2, E2 = tokens(2, 40, 7)
    gram_embedding(idx, E, N)                                       # 16 × 16 token tiles
    gram_embedding(idx, E, N, 0, idx2, E2)                          # cross, padding, 16 × 32
    idx33, E33 = tokens(2, 33, 7)
    gram_embedding(idx33, E33, N, 3, diagonal=True)                 # 32 × 32
    idx64, E64 = tokens(4, 64, 32)
    gram_embedding(idx64, E64, N)                                   # aligned
    E_t = torch.randn(2, 7, 33, generator=g).to(dtype).transpose(1, 2)
    gram_embedding(idx33, E_t, N, idx2=idx33, E2=E33, diagonal=True)  # strided E

    weighted_sum_embedding(idx, E, torch.randn(3, generator=g), N)  # c (B,): m = 1
    idx20, E20 = tokens(3, 5, 20)
    weighted_sum_embedding(idx20, E20, torch.randn(3, 3, generator=g), N, 0)
    idx40, E40 = tokens(2, 9, 40)
    weighted_sum_embedding(idx40, E40, torch.randn(2, 20, generator=g), N)
    idx16, E16 = tokens(4, 16, 64)
    weighted_sum_embedding(idx16, E16, torch.randn(4, 32, generator=g), N)
    weighted_sum_embedding(idx33, E_t, torch.randn(2, 3, generator=g), N)

    project_embedding(idx, E, torch.randn(N, 7, generator=g).to(dtype))
    project_embedding(idx40, E40, torch.randn(3, N, 40, generator=g).to(dtype), 0)
    project_embedding(idx16, E16, torch.randn(2, N, 64, generator=g))  # V fp32, E not
    project_embedding(idx33, E_t, torch.randn(N, 7, generator=g).to(dtype))


def _embedding_tf32_calls(dtype, g):
    """The smallest and largest tiles of the embedding kernels that take a PRECISION."""
    from lowrank_kernels.triton.gram_embedding import gram_embedding
    from lowrank_kernels.triton.weighted_sum_embedding import weighted_sum_embedding

    N = 11
    for B, T, d, m in ((3, 5, 7, 3), (2, 40, 64, 20)):
        idx = torch.randint(N, (B, T), generator=g)
        E = torch.randn(B, T, d, generator=g).to(dtype)
        gram_embedding(idx, E, N)
        weighted_sum_embedding(idx, E, torch.randn(B, m, generator=g), N)


def _sketch_matmul_calls(dtype, g):
    """Every tile shape, both distributions, transpose (strided M), 32-bit and 64-bit seeds
    (and seed 1, which the JIT makes a constant), the split-K path an H100 would take."""
    from lowrank_kernels.triton.sketch_matmul import sketch_matmul

    def M(m, n):
        return torch.randn(m, n, generator=g).to(dtype)

    sketch_matmul(M(5, 37), 7, 0, False, False, 0)                  # 16 × 16 tiles
    sketch_matmul(M(37, 130), 20, 2 ** 40 + 3, True, True, 7)       # Ωᵀ M: 128 × 32
    sketch_matmul(M(40, 50), 40, 1, False, False, 5)                # 64 × 64
    sketch_matmul(M(20, 9), 3, 12345, True, False, 2 ** 33)         # 32 × 16, 64-bit offset
    sketch_matmul(M(64, 256), 64, 16, False, False, 0)              # aligned
    for rademacher in (False, True):                                # split-K
        sketch_matmul(M(8, 8192), 10, 99, rademacher, False, 0)


def _sketch_omega_calls(g):
    from lowrank_kernels.triton.sketch_omega import sketch_omega

    rows = torch.randint(0, 1000, (37,), generator=g)
    sketch_omega(rows, 10, 0, False, 0)
    sketch_omega(rows, 70, 2 ** 40 + 1, True, 8)
    sketch_omega(rows[:32], 32, 1, False, 4)


def _launches(dtype):
    from lowrank_kernels.triton import (gram_embedding, project_embedding, sketch_matmul,
                                        sketch_omega, weighted_sum_embedding)

    splits = sketch_matmul._splits

    def drive():
        g = torch.Generator().manual_seed(0)
        patch = pytest.MonkeyPatch()
        # The split-K factor of a GPU with H100_SMS multiprocessors (the launcher's own rule).
        patch.setattr(torch.cuda, "get_device_properties",
                      lambda device: types.SimpleNamespace(multi_processor_count=H100_SMS))
        patch.setattr(sketch_matmul, "_splits", lambda tiles, inner, block_k, device:
                      splits(tiles, inner, block_k, torch.device("cuda")))
        try:
            with _tf32(False):
                _embedding_calls(dtype, g)
                _sketch_matmul_calls(dtype, g)
                if dtype == torch.float32:  # Ω is float32 (rows int64): no other dtype
                    _sketch_omega_calls(g)
            # With TF32 allowed, the fp32 products of the kernels with a PRECISION
            # (embedding Gram and weighted sum, sketch_matmul) are TF32 tensor-core dots.
            with _tf32(True):
                _embedding_tf32_calls(dtype, g)
                _sketch_matmul_calls(dtype, g)
        finally:
            patch.undo()

    launches = triton_compile.record([gram_embedding, weighted_sum_embedding, project_embedding,
                                      sketch_matmul, sketch_omega], drive)
    split_k = [launch for launch in launches
               if launch.fn.__name__ == "_sketch_matmul_kernel" and launch.grid[2] > 1]
    assert split_k, "no split-K launch of _sketch_matmul_kernel was recorded"
    return launches


CASES = {name: (lambda dtype=getattr(torch, name): _launches(dtype))
         for name in ("float32", "float16", "bfloat16")}


@pytest.mark.parametrize("dtype", sorted(CASES))
def test_kernels_compile_for_sm90(dtype):
    """fp32 and fp16 kernels also run under the interpreter in the ops' tests; bf16 (GPU-only
    there) is compiled nowhere else."""
    compiled = triton_compile.compile_in_child(__file__, dtype)
    kernels = [name for name in triton_compile.expected_kernels(MODULES)
               if dtype == "float32" or not name.startswith("sketch_omega:")]
    assert compiled == kernels


def test_every_kernel_module_is_compiled_by_exactly_one_file():
    """Every `_..._kernel` of lowrank_kernels/triton/*.py belongs to one file's COVERAGE (each of
    those files asserts that it compiles every kernel of its modules); the @triton.jit helpers
    without a kernel (philox, token_rows) are imported by covered kernel modules, whose
    kernels compile them."""
    here = Path(__file__).parent
    listed = [module for modules in triton_compile.COVERAGE.values() for module in modules]
    assert sorted(listed) == sorted(set(listed)), "a module is listed by two files"
    assert sorted(listed) == sorted(triton_compile.kernels_by_module())
    for file in triton_compile.COVERAGE:
        source = (here / file).read_text()
        assert "triton_compile.COVERAGE[Path(__file__).name]" in source, file
        assert "triton_compile.main(CASES)" in source, file
    for helper in triton_compile.jit_helper_modules():
        users = [module for module in listed
                 if f"from .{helper} import" in (triton_compile.TRITON_DIR
                                                 / f"{module}.py").read_text()]
        assert users, f"no covered kernel module uses lowrank_kernels/triton/{helper}.py"


if __name__ == "__main__":
    triton_compile.main(CASES)
