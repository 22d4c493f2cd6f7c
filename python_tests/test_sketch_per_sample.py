"""Sketches of per-sample gradients (random projection S U, Kronecker sketch of the factors,
token subsampling), checked statistically against the exact Gram K = UᵀU built from
materialized per-sample gradients in float64:

- unbiasedness: over a fixed set of seeds, every entry's mean is within 5 standard errors
  (empirical std / √n_seeds) of the exact value — deterministic, since the seeds are fixed;
- the relative RMS error shrinks like s^(−1/2): slope of log error vs log s over
  s ∈ {4, 16, 64, 256} is −0.5 ± 0.12;
- reproducibility: bitwise equal across calls, and across backends (exactly representable
  products: integer-valued inputs with a Rademacher sketch).
"""
import math

import pytest
import torch
from conftest import backends_for

import lowrank_kernels as lk


pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(B=5, T=3, d_in=6, d_out=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, T, d_in, generator=g, dtype=torch.float64).to(dtype)
    E = torch.randn(B, T, d_out, generator=g, dtype=torch.float64).to(dtype)
    return A, E


def _gradients(A, E, bias=False):
    """U ᵀ (B × D): per-sample gradients g_i = Σ_t e_it a_itᵀ (row-major), then Σ_t e_it."""
    A3 = A if A.dim() == 3 else A[:, None]
    E3 = E if E.dim() == 3 else E[:, None]
    G = torch.einsum("bto,btp->bop", E3.double(), A3.double()).flatten(1)
    return torch.cat([G, E3.double().sum(1)], 1) if bias else G


def _assert_unbiased(samples, exact, what, z_max=5.0):
    """|mean − exact| ≤ z_max · std/√n for every entry (entries with zero variance: equal)."""
    x = torch.stack(samples).double()
    n = x.shape[0]
    mean, se = x.mean(0), x.std(0) / math.sqrt(n)
    z = (mean - exact).abs() / se.clamp_min(1e-300)
    assert float(z.max()) <= z_max, f"{what}: max z-score {float(z.max()):.2f} over {n} seeds"


def _slope(s_values, errors):
    x = [math.log(s) for s in s_values]
    y = [math.log(e) for e in errors]
    xm, ym = sum(x) / len(x), sum(y) / len(y)
    return sum((a - xm) * (b - ym) for a, b in zip(x, y)) / sum((a - xm) ** 2 for a in x)


def _rms_relative_error(gram_of_seed, K, n_seeds=32):
    sq = [float(torch.linalg.matrix_norm(gram_of_seed(seed) - K) ** 2) for seed in range(n_seeds)]
    return math.sqrt(sum(sq) / n_seeds) / float(torch.linalg.matrix_norm(K))


def _projected_gram(A, E, s, seed, bias=False, dist="gaussian"):
    P = lk.project_per_sample_gradients(A, E, s, seed=seed, bias=bias, dist=dist)
    return P.T @ P


# ---- (a) random projection S U -------------------------------------------------------------

def test_projection_matches_materialized_omega():
    """P = Ω[0:D]ᵀ U / √s with Ω from sketch_omega: the layer is never materialized, but
    the result is the same linear map."""
    A, E = _layer(T=4)
    U = _gradients(A, E, bias=True).T  # D × B
    s = 9
    om = lk.sketch_omega(torch.arange(U.shape[0]), s, 3, backend="reference").double()
    P = lk.project_per_sample_gradients(A, E, s, seed=3, bias=True, block_elements=40)
    torch.testing.assert_close(P, om.T @ U / math.sqrt(s), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_projection_gram_is_unbiased(bias, dist):
    A, E = _layer()
    G = _gradients(A, E, bias)
    K = G @ G.T
    # s = 64: the standard error is small enough that a 10% bias would give z > 10.
    samples = [_projected_gram(A, E, 64, seed, bias, dist) for seed in range(300)]
    _assert_unbiased(samples, K, f"S U Gram ({dist}, bias={bias})")


def test_projection_error_shrinks_like_inverse_sqrt_s():
    A, E = _layer()
    G = _gradients(A, E)
    K = G @ G.T
    s_values = (4, 16, 64, 256)
    errors = [_rms_relative_error(lambda seed: _projected_gram(A, E, s, seed), K)
              for s in s_values]
    assert abs(_slope(s_values, errors) + 0.5) <= 0.12, errors


# ---- (b) Kronecker sketch of the factors ---------------------------------------------------

@pytest.mark.parametrize("bias", [False, True])
def test_kronecker_sketch_gram_is_unbiased(bias):
    A, E = _layer()
    G = _gradients(A, E, bias)
    K = G @ G.T
    # (s_in, s_out) = (48, 32): a 10% bias would give z ≈ 7.
    samples = [lk.kronecker_sketch_gram(A, E, 48, 32, bias=bias, seed=seed)
               for seed in range(300)]
    _assert_unbiased(samples, K, f"Kronecker sketch Gram (bias={bias})")


def test_kronecker_sketch_error_shrinks_like_inverse_sqrt_s():
    A, E = _layer()
    G = _gradients(A, E)
    K = G @ G.T
    s_values = (4, 16, 64, 256)
    errors = [_rms_relative_error(lambda seed: lk.kronecker_sketch_gram(A, E, s, s, seed=seed),
                                  K) for s in s_values]
    assert abs(_slope(s_values, errors) + 0.5) <= 0.12, errors


def test_kronecker_sketch_factors_are_the_sketched_gradients():
    """Ẽ_iᵀÃ_i = S_out g_i S_inᵀ with S = Ωᵀ/√s from sketch_omega (two independent seeds)."""
    from lowrank_kernels.sketch.per_sample import output_side_seed
    A, E = _layer(T=2)
    A_sk, E_sk = lk.kronecker_sketch(A, E, 5, 3, seed=11)
    assert A_sk.shape == (5, 2, 5) and E_sk.shape == (5, 2, 3)
    S_in = lk.sketch_omega(torch.arange(6), 5, 11, backend="reference").double().T / math.sqrt(5)
    S_out = lk.sketch_omega(torch.arange(4), 3, output_side_seed(11),
                            backend="reference").double().T / math.sqrt(3)
    g = torch.einsum("bto,btp->bop", E, A)
    sketched = torch.einsum("bto,btp->bop", E_sk, A_sk)
    torch.testing.assert_close(sketched, S_out @ g @ S_in.T, rtol=1e-12, atol=1e-12)
    A2, E2 = lk.kronecker_sketch(A[:, 0], E[:, 0], 5, 3, seed=11)  # T = 1: 2-D factors
    torch.testing.assert_close(A2, A_sk[:, 0], rtol=0, atol=0)


# ---- (c) token subsampling -----------------------------------------------------------------

def test_token_subsample_is_uniform_without_replacement():
    A, E = _layer(B=3, T=7)
    counts = torch.zeros(3, 7)
    n = 700
    for seed in range(n):
        A_sub, _ = lk.token_subsample(A, E, 3, seed=seed)
        # recover the chosen token of each row of A_sub (the rows of A are distinct)
        idx = (A_sub[:, :, None, :] == A[:, None, :, :]).all(-1).float().argmax(-1)  # 3 × 3
        assert all(len(set(r.tolist())) == 3 for r in idx)
        counts.scatter_add_(1, idx, torch.ones(3, 3))
    p = 3 / 7  # inclusion probability
    z = (counts / n - p).abs() / math.sqrt(p * (1 - p) / n)
    assert float(z.max()) <= 5.0


def test_token_subsample_gradients_and_off_diagonal_gram_are_unbiased():
    A, E = _layer(B=4, T=6)
    G = _gradients(A, E, bias=True)
    K = G @ G.T
    grads, grams = [], []
    for seed in range(300):
        A_sub, E_sub = lk.token_subsample(A, E, 2, seed=seed)
        grads.append(_gradients(A_sub, E_sub, bias=True))
        grams.append(lk.token_subsample_gram(A, E, 2, bias=True, seed=seed))
    _assert_unbiased(grads, G, "subsampled per-sample gradients (T/s) Σ_{t∈S} e a^T")
    off = ~torch.eye(4, dtype=torch.bool)
    _assert_unbiased([k[off] for k in grams], K[off], "subsampled Gram, i ≠ j")
    # The diagonal is biased upwards by tr Cov(ĝ_i) (documented): the mean exceeds K_ii.
    assert torch.all(torch.stack(grams).mean(0).diagonal() > K.diagonal())


def test_token_subsample_with_all_tokens_is_exact():
    A, E = _layer(B=4, T=5)
    G = _gradients(A, E, bias=True)
    torch.testing.assert_close(lk.token_subsample_gram(A, E, 5, bias=True, seed=3), G @ G.T,
                               rtol=1e-12, atol=1e-12)


# ---- reproducibility -----------------------------------------------------------------------

def test_reproducible_across_calls():
    A, E = _layer(dtype=torch.float32)
    for f in (lambda seed: lk.project_per_sample_gradients(A, E, 7, seed=seed),
              lambda seed: lk.kronecker_sketch_gram(A, E, 4, 3, seed=seed),
              lambda seed: lk.token_subsample_gram(A, E, 2, seed=seed)):
        assert torch.equal(f(5), f(5))
        assert not torch.equal(f(5), f(6))


def test_reproducible_across_backends():
    """Integer-valued inputs and ±1 sketch entries make every product and sum exact in fp32,
    so all backends must return the same bits."""
    g = torch.Generator().manual_seed(1)
    A = torch.randint(-3, 4, (5, 3, 6), generator=g).float()
    E = torch.randint(-3, 4, (5, 3, 4), generator=g).float()
    results = {b: lk.project_per_sample_gradients(A, E, 8, seed=2, dist="rademacher", backend=b)
               for b in backends_for("sketch_matmul", "cpu")}
    first = next(iter(results.values()))
    for b, P in results.items():
        assert torch.equal(P, first), b
    kron = {b: lk.kronecker_sketch(A, E, 4, 3, seed=2, dist="rademacher", backend=b)
            for b in backends_for("sketch_matmul", "cpu")}
    ref = kron["reference"]
    for b, (A_sk, E_sk) in kron.items():
        assert torch.equal(A_sk, ref[0]) and torch.equal(E_sk, ref[1]), b


def test_bad_inputs_name_the_argument():
    A, E = _layer()
    with pytest.raises(ValueError, match="A must be a 2 or 3-D tensor"):
        lk.project_per_sample_gradients(A[None], E, 3)
    with pytest.raises(ValueError, match="A and E must have the same leading dims"):
        lk.project_per_sample_gradients(A[:, :2], E, 3)
    with pytest.raises(ValueError, match="s must be a positive int"):
        lk.project_per_sample_gradients(A, E, 0)
    with pytest.raises(ValueError, match="s_out must be a positive int"):
        lk.kronecker_sketch(A, E, 3, -1)
    with pytest.raises(ValueError, match="seed must be an int"):
        lk.kronecker_sketch(A, E, 3, 2, seed=-2)
    with pytest.raises(ValueError, match="dist must be 'gaussian' or 'rademacher'"):
        lk.project_per_sample_gradients(A, E, 3, dist="srht")
    with pytest.raises(ValueError, match="s must be <= T"):
        lk.token_subsample(A, E, 4)
    with pytest.raises(ValueError, match="must be 3-D"):
        lk.token_subsample(A[:, 0], E[:, 0], 1)
    with pytest.raises(ValueError, match="A and E must have the same dtype"):
        lk.kronecker_sketch(A, E.float(), 3, 2)


@pytest.mark.cuda
def test_reproducible_across_devices():
    """Exact products (integer inputs, ±1 sketch): the GPU (Triton) gives the CPU's bits."""
    g = torch.Generator().manual_seed(1)
    A = torch.randint(-3, 4, (5, 3, 6), generator=g).float()
    E = torch.randint(-3, 4, (5, 3, 4), generator=g).float()
    cpu = lk.project_per_sample_gradients(A, E, 8, seed=2, dist="rademacher")
    gpu = lk.project_per_sample_gradients(A.cuda(), E.cuda(), 8, seed=2, dist="rademacher")
    assert torch.equal(gpu.cpu(), cpu)
    K_cpu = lk.kronecker_sketch_gram(A, E, 4, 3, seed=2, dist="rademacher")
    K_gpu = lk.kronecker_sketch_gram(A.cuda(), E.cuda(), 4, 3, seed=2, dist="rademacher")
    torch.testing.assert_close(K_gpu.cpu(), K_cpu, rtol=1e-6, atol=1e-4)
