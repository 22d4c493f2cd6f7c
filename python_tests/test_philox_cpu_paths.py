"""The CPU kernels that generate Ω (csrc/random_subspace.cpp, sketch_matmul.cpp, sketch_omega.cpp
on lowrank/philox_lanes.h): the AVX2 register kernels, the baseline-ISA code (LOWRANK_NO_AVX2=1)
and any thread count give the same bits, and the Ω they use is the reference's bit for bit —
at odd sizes (rows not a multiple of the 8-row batches, column groups not a multiple of the
4-group steps, more than one 64-group projection block, several row chunks) and at row indices
across 2³²."""
import os
import subprocess
import sys

import pytest
import torch

import lowrank_kernels as lk
from lowrank_kernels.reference.sketch_omega import sketch_omega as ref_omega

pytestmark = pytest.mark.skipif("native" not in lk.REGISTRY["random_subspace_project"].backends,
                                reason="needs the native extension")

# Every kernel on inputs that take its tails; run in a fresh process per setting (the AVX2
# switch is read once per process; no thread toggling inside one process).
_SCRIPT = r"""
import sys, torch
torch.set_num_threads(int(sys.argv[2]))
import lowrank_kernels as lk
g = torch.Generator().manual_seed(0)
r = lambda *s, dtype=torch.float32: torch.randn(*s, generator=g, dtype=dtype)
out = {}
for dist in ("gaussian", "rademacher"):
    out["expand32", dist] = lk.random_subspace_expand(r(301), 5, 70001, 0.01, dist, r(70001))
    out["expand64", dist] = lk.random_subspace_expand(r(70, dtype=torch.float64), 5, 5003, 0.3, dist)
    out["project32", dist] = lk.random_subspace_project(r(70001), 2 ** 40 + 3, 301, 0.01, dist)
    out["project64", dist] = lk.random_subspace_project(r(5003, dtype=torch.float64), 5, 70, 0.3,
                                                        dist)
    out["matmul", dist] = lk.sketch_matmul(r(37, 1001), 13, 9, dist, False, 2 ** 32 - 500)
    out["matmul_t", dist] = lk.sketch_matmul(r(1001, 29), 70, 9, dist, True, 3)
    out["matmul64", dist] = lk.sketch_matmul(r(50, 301, dtype=torch.float64), 9, 9, dist)
    out["omega", dist] = lk.sketch_omega(torch.randint(0, 2 ** 40, (333,), generator=g), 21, 4,
                                         dist, 8)
torch.save(out, sys.argv[1])
"""


def _outputs(tmp_path, threads, avx2):
    path = tmp_path / f"out_{threads}_{avx2}.pt"
    env = dict(os.environ, LOWRANK_NO_AVX2="0" if avx2 else "1")
    subprocess.run([sys.executable, "-c", _SCRIPT, str(path), str(threads)], env=env, check=True,
                   timeout=600)
    return torch.load(path)


def test_avx2_baseline_and_threads_give_the_same_bits(tmp_path):
    first = _outputs(tmp_path, 1, True)
    for threads, avx2 in ((2, True), (1, False)):
        other = _outputs(tmp_path, threads, avx2)
        for key, value in first.items():
            assert torch.equal(value, other[key]), f"{key}: threads={threads} avx2={avx2}"


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_project_reads_rows_of_the_reference_omega(dist):
    """A one-hot g reads row i of Ω out exactly: rows at the edges of the 8-row batches, the
    32-batch tiles and the fixed row chunks (D = 20011: chunks of 1256 rows); 301 columns (a
    second 64-group block, a partial group)."""
    seed, D, d = 2 ** 50 + 1, 20011, 301
    rows = [0, 7, 8, 255, 256, 1255, 1256, 1257, 20003, 20010]
    ref = ref_omega(torch.tensor(rows), d, seed, dist == "rademacher")
    for r, i in enumerate(rows):
        e = torch.zeros(D)
        e[i] = 1.0
        assert torch.equal(lk.random_subspace_project(e, seed, d, 1.0, dist), ref[r]), f"row {i}"


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("k", [1, 13, 70])
@pytest.mark.parametrize("offset", [0, 3, 2 ** 32 - 21, 2 ** 62])
def test_sketch_matmul_reads_the_reference_omega(dist, k, offset):
    """Y = M Ω with M = I (and Ωᵀ M) is Ω itself, bit for bit (each entry one product with 1),
    for row offsets whose 8-row batches are unaligned and cross 2³²."""
    seed, n = 77, 45
    ref = ref_omega(torch.arange(offset, offset + n), k, seed, dist == "rademacher")
    eye = torch.eye(n)
    assert torch.equal(lk.sketch_matmul(eye, k, seed, dist, False, offset), ref)
    assert torch.equal(lk.sketch_matmul(eye, k, seed, dist, True, offset), ref.T)
    assert torch.equal(lk.sketch_matmul(eye.double(), k, seed, dist, True, offset),
                       ref.T.double())
