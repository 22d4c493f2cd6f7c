"""Ω at a radius word a ≥ 2³² − 128, where y = 1 − w rounds to 1 and radius_squared takes −w
for ln u (its `one` branch; about one word in 2²⁵, so random inputs almost never reach it):
every CPU kernel that generates Ω (the AVX2 register code of lowrank/philox_lanes.h in
sketch_omega, sketch_matmul and random_subspace) gives the reference's bits there."""
import pytest
import torch

import lowrank_kernels as lk
from lowrank_kernels.reference.sketch_omega import omega_words
from lowrank_kernels.reference.sketch_omega import sketch_omega as ref_omega

pytestmark = pytest.mark.skipif("native" not in lk.REGISTRY["random_subspace_project"].backends,
                                reason="needs the native extension")

# Found by a search over the words: Philox(seed 7, row 15514861, group 0) has x2 = 0xffffffe7,
# the radius word of columns 2 and 3.
SEED, ROW = 7, 15514861
BATCH = torch.arange(ROW - 5, ROW + 3)  # the AVX2 8-row batch that holds ROW (rows 8m .. 8m+7)


def test_the_row_holds_an_edge_word():
    x = omega_words(torch.tensor([ROW]), 1, SEED)
    assert int(x[2][0, 0]) >= 2 ** 32 - 128


def test_sketch_omega_and_matmul_at_the_edge_word():
    ref = ref_omega(BATCH, 8, SEED)
    assert torch.isfinite(ref).all()
    assert torch.equal(lk.sketch_omega(BATCH, 8, SEED, backend="native"), ref)
    eye = torch.eye(len(BATCH))
    assert torch.equal(lk.sketch_matmul(eye, 8, SEED, "gaussian", False, int(BATCH[0])), ref)
    assert torch.equal(lk.sketch_matmul(eye, 8, SEED, "gaussian", True, int(BATCH[0])), ref.T)


def test_random_subspace_at_the_edge_word():
    """One-hot inputs read the entries out exactly: g = e_ROW gives row ROW of Ω (project),
    α = e_j column j (expand)."""
    D, d = ROW + 3, 4
    ref = ref_omega(torch.tensor([ROW]), d, SEED)[0]
    e = torch.zeros(D)
    e[ROW] = 1.0
    assert torch.equal(lk.random_subspace_project(e, SEED, d, 1.0), ref)
    for j in (2, 3):
        alpha = torch.zeros(d)
        alpha[j] = 1.0
        assert torch.equal(lk.random_subspace_expand(alpha, SEED, D, 1.0)[ROW], ref[j])
