"""sketch_omega: the counter-based Ω_ij = f(seed, i, j) — Philox4x32-10 against the Random123
known-answer vectors, the same Ω bit for bit from the PyTorch reference, the C++ header
(native op) and the Triton generator (interpreter on CPU), the float32 Box–Muller at pinned
edge words and against the float64 formula, and its distribution."""
import math

import pytest
import torch
from conftest import DEVICES, backends_for

import lowrank_kernels as lk
from lowrank_kernels.reference.sketch_omega import _box_muller, omega_words, philox4x32_10


pytestmark = pytest.mark.usefixtures("one_thread")


# Random123 kat_vectors, philox4x32_10: (counter, key, output).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _params():
    return [pytest.param(d, b, id=f"{d}-{b}", marks=[pytest.mark.cuda] if d == "cuda" else [])
            for d in DEVICES for b in backends_for("sketch_omega", d, torch.int64)]


def _ulp_distance(a, b):
    """|a − b| in units of the float32 grid (ordered integer representation)."""
    def ordered(x):
        i = x.contiguous().view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)
    return (ordered(a) - ordered(b)).abs()


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_reference_philox_known_answers(counter, key, expected):
    c = [torch.tensor([x], dtype=torch.int64) for x in counter]
    out = philox4x32_10(*c, *key)
    assert [int(x) for x in out] == list(expected)


ROWS = torch.cat([torch.arange(37), torch.tensor([2 ** 31 - 1, 2 ** 32, 2 ** 40 + 12345,
                                                   2 ** 62 + 7])])


@pytest.mark.parametrize("device,backend", _params())
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("k,col_offset", [(1, 0), (13, 0), (7, 8), (33, 4)])
def test_backends_agree_bit_for_bit(device, backend, dist, k, col_offset):
    seed = 0x1234_5678_9ABC
    rows = ROWS.to(device)
    ours = lk.sketch_omega(rows, k, seed, dist, col_offset, backend=backend).cpu()
    ref = lk.sketch_omega(ROWS, k, seed, dist, col_offset, backend="reference")
    assert ours.dtype == torch.float32 and ours.shape == (ROWS.numel(), k)
    if device == "cpu":  # the same float32 operations, none fused: the same bits
        assert torch.equal(ours, ref)
    else:  # compiled Triton fuses a·b + c into FMAs (enable_fp_fusion)
        assert int(_ulp_distance(ours, ref).max()) <= 2


@pytest.mark.skipif("native" not in backends_for("sketch_omega", "cpu", torch.int64),
                    reason="needs the native extension")
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_native_is_the_reference_on_a_million_entries(dist):
    """Every entry of a 1M-entry block (rows up to 2⁶², a column offset), bit for bit."""
    rows = torch.cat([torch.arange(8192), ROWS[-4:], torch.arange(2 ** 40, 2 ** 40 + 60)])
    ours = lk.sketch_omega(rows, 124, 77, dist, 12, backend="native")
    assert ours.numel() >= 1_000_000
    assert torch.equal(ours, lk.sketch_omega(rows, 124, 77, dist, 12, backend="reference"))


# box_muller(a, b) at the edge words, as pinned in csrc/tests/test_philox_core.cpp.
_EDGES = [0, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1]
_PINNED = [("0x1.b0e08ep+2", "0x1.53fb1ep-28"), ("0x1.2d6abep+0", "0x1.d976f4p-31"),
           ("0x1.2d6abep+0", "0x1.d976f4p-31"), ("0x1.000000p-16", "0x1.921fb6p-47")]
_SIGNS = [(1, 1), (-1, 1), (-1, -1), (1, -1)]  # θ ≈ 0, π, π, 2π for the edge words b


def _box_muller_float64(a, b):
    u = (a.double() + 0.5) * 2.0 ** -32
    v = (b.double() + 0.5) * 2.0 ** -32
    r = torch.sqrt(-2 * torch.log(u))
    return r * torch.cos(2 * math.pi * v), r * torch.sin(2 * math.pi * v)


def test_box_muller_at_the_edge_words():
    a = torch.tensor([x for x in _EDGES for _ in _EDGES])
    b = torch.tensor(_EDGES * 4)
    z_cos, z_sin = _box_muller(a, b)
    want_cos = [sc * float.fromhex(p[0]) for p in _PINNED for sc, _ in _SIGNS]
    want_sin = [ss * float.fromhex(p[1]) for p in _PINNED for _, ss in _SIGNS]
    assert z_cos.tolist() == want_cos and z_sin.tolist() == want_sin
    c64, s64 = _box_muller_float64(a, b)
    assert float((z_cos - c64).abs().max()) < 3e-7 and float((z_sin - s64).abs().max()) < 3e-7


def test_definition_of_the_entries():
    """Ω_ij from the Philox words: Box–Muller of (x0, x1) / (x2, x3) in float32, within
    4 float32 ulps of the float64 formula (measured over 2M pairs: 4); Rademacher sign bits."""
    seed, rows = 987654321, torch.cat([torch.arange(4000), torch.tensor([2 ** 33 + 1])])
    x = omega_words(rows, 2, seed)  # columns 0..7
    g = lk.sketch_omega(rows, 8, seed, backend="reference")
    for p in range(2):
        z_cos, z_sin = _box_muller(x[2 * p], x[2 * p + 1])
        assert torch.equal(g[:, 2 * p::4], z_cos) and torch.equal(g[:, 2 * p + 1::4], z_sin)
        c64, s64 = _box_muller_float64(x[2 * p], x[2 * p + 1])
        assert int(_ulp_distance(z_cos, c64.float()).max()) <= 4
        assert int(_ulp_distance(z_sin, s64.float()).max()) <= 4
    rad = lk.sketch_omega(rows, 8, seed, "rademacher", backend="reference")
    for q in range(4):
        assert torch.equal(rad[:, q::4], 1.0 - 2.0 * (x[q] >> 31).float())


def test_gaussian_moments_and_independence():
    """Mean 0, variance 1, kurtosis 3 and uncorrelated columns/rows, at ~5 standard errors."""
    om = lk.sketch_omega(torch.arange(2000), 64, 11).double()  # 128000 entries
    n = om.numel()
    assert abs(float(om.mean())) < 5 / math.sqrt(n)
    assert abs(float((om ** 2).mean()) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float((om ** 4).mean()) - 3) < 5 * math.sqrt(96 / n)
    corr = (om.T @ om) / om.shape[0]  # 64 × 64, off-diagonal sd 1/√2000
    off = corr - torch.diag(torch.diag(corr))
    assert float(off.abs().max()) < 5.5 / math.sqrt(om.shape[0])
    rad = lk.sketch_omega(torch.arange(2000), 64, 11, "rademacher")
    assert set(rad.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(rad.double().mean())) < 5 / math.sqrt(n)


def test_seeds_give_different_streams_and_same_seed_repeats():
    rows = torch.arange(50)
    a, b = lk.sketch_omega(rows, 9, 1), lk.sketch_omega(rows, 9, 2)
    assert torch.equal(a, lk.sketch_omega(rows, 9, 1))
    assert float((a == b).float().mean()) < 0.01


def test_bad_inputs_name_the_argument():
    rows = torch.arange(4)
    with pytest.raises(ValueError, match="rows must be a 1-D tensor"):
        lk.sketch_omega(rows[None], 3)
    with pytest.raises(TypeError, match="rows must be int64"):
        lk.sketch_omega(rows.int(), 3)
    with pytest.raises(ValueError, match="rows must be >= 0"):
        lk.sketch_omega(rows - 1, 3)
    with pytest.raises(ValueError, match="k must be >= 0"):
        lk.sketch_omega(rows, -1)
    with pytest.raises(ValueError, match="seed must be in"):
        lk.sketch_omega(rows, 3, -5)
    with pytest.raises(ValueError, match="dist must be 'gaussian' or 'rademacher'"):
        lk.sketch_omega(rows, 3, 0, "uniform")
    with pytest.raises(ValueError, match="col_offset must be a multiple of 4"):
        lk.sketch_omega(rows, 3, 0, "gaussian", 2)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
        lk.sketch_omega(rows, 3, 2 ** 63)
    with pytest.raises(TypeError, match="seed must be an int"):
        lk.sketch_omega(rows, 3, True)
