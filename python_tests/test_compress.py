"""Low-rank compression: Eckart–Young error of the randomized factors, the rank rules, the
replaced layers computing W_r exactly, and the report's counts."""
import math

import pytest
import torch

from lowrank_kernels.compress import choose_rank, compress, effective_rank


def _with_spectrum(out_dim, in_dim, sigma, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(out_dim, len(sigma), generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(in_dim, len(sigma), generator=g, dtype=torch.float64))[0]
    return (U * sigma) @ V.T


SIGMA = 0.7 ** torch.arange(30, dtype=torch.float64)


@pytest.mark.parametrize("r", [1, 5, 12])
def test_linear_error_is_the_discarded_singular_values(r):
    """‖W − W_r‖_F² = Σ_{i>r} σ_i²: never less (Eckart–Young), and not measurably more — with
    10 oversampling columns and 4 power iterations the excess is of order (σ_{r+11}/σ_{r+1})^18
    = 0.7^180 ≈ 1e-28 relative, below float64 rounding; the slack allows rounding only."""
    layer = torch.nn.Linear(40, 50, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(_with_spectrum(50, 40, SIGMA))
    W = layer.weight.detach().clone()
    model = torch.nn.Sequential(layer)
    compress(model, rank=r)
    first, second = model[0][0], model[0][1]
    W_r = (second.weight @ first.weight).detach()
    tail = float((SIGMA[r:] ** 2).sum())
    err2 = float(torch.linalg.matrix_norm(W - W_r) ** 2)
    eps = 1e-13 * float(SIGMA[0] ** 2)
    assert tail - eps <= err2 <= tail * (1 + 1e-9) + eps, (err2, tail)
    torch.testing.assert_close(second.bias, layer.bias)


def test_conv2d_factors_compute_the_truncated_layer():
    conv = torch.nn.Conv2d(6, 8, 3, stride=2, padding=1, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(_with_spectrum(8, 54, SIGMA[:8], seed=1).reshape(8, 6, 3, 3))
    W = conv.weight.detach().reshape(8, -1).clone()
    x = torch.randn(2, 6, 9, 11, dtype=torch.float64)
    model = torch.nn.Sequential(conv)
    _, report = compress(model, rank=3, example_input=x)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    W3 = ((U[:, :3] * S[:3]) @ Vh[:3]).reshape(8, 6, 3, 3)
    expected = torch.nn.functional.conv2d(x, W3, conv.bias, stride=2, padding=1)
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-12)
    layer = report.layers[0]
    positions = 5 * 6  # H_out × W_out per sample
    assert (layer.rank, layer.params_before, layer.params_after) == (3, 8 * 54 + 8,
                                                                      3 * (54 + 8) + 8)
    assert (layer.flops_before, layer.flops_after) == (2 * 8 * 54 * positions,
                                                        2 * 3 * (54 + 8) * positions)
    assert math.isclose(layer.relative_error, float(S[3:].norm() / S.norm()), rel_tol=1e-6)


def test_effective_rank_and_energy_rules():
    assert math.isclose(effective_rank(torch.ones(7)), 7.0, rel_tol=1e-12)
    assert math.isclose(effective_rank(torch.tensor([3.0, 0.0, 0.0])), 1.0, rel_tol=1e-12)
    S = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    p = S / S.sum()
    assert math.isclose(effective_rank(S), math.exp(-float((p * p.log()).sum())), rel_tol=1e-12)
    assert choose_rank(S, use_effective_rank=True) == math.ceil(effective_rank(S))
    # energies 16, 20, 21, 22 of 22
    assert choose_rank(S, energy=16 / 22) == 1
    assert choose_rank(S, energy=0.9) == 2
    assert choose_rank(S, energy=21 / 22) == 3
    assert choose_rank(S, energy=1.0) == 4
    assert choose_rank(S, rank=9) == 4


def test_model_report_keeps_layers_that_would_grow():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    with torch.no_grad():
        model[0].weight.copy_(_with_spectrum(64, 64, SIGMA).float())
    x = torch.randn(5, 64)
    _, report = compress(model, energy=0.99, example_input=x)
    first, last = report.layers
    assert first.rank == choose_rank(SIGMA, energy=0.99) and last.rank is None  # 3×64: kept
    assert isinstance(model[0], torch.nn.Sequential) and isinstance(model[2], torch.nn.Linear)
    assert report.params_after == sum(p.numel() for p in model.parameters())
    assert report.params_before - report.params_after == 64 * 64 - first.rank * 128
    assert "| **model** |" in report.to_markdown()


def test_bad_input():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"exactly one of rank=, energy= or effective_rank"):
        compress(model, rank=2, energy=0.5)
    with pytest.raises(ValueError, match=r"energy must be in \(0, 1\]"):
        compress(model, energy=1.5)
    with pytest.raises(ValueError, match=r"rank must be ≥ 1"):
        compress(model, rank=0)
