"""gram_embedding, weighted_sum_embedding, project_embedding against per-sample gradients of
F.embedding from torch.func (float64), with a priori bounds for the fp32 kernels."""
import pytest
import torch
import torch.nn.functional as F
from conftest import device_backend_params
from numerics import U32, assert_within, gamma

import lowrank_kernels as lk

# (B, T, num_embeddings, d): B = 1, T = 1, primes, several token blocks and d blocks, many
# repeated indices (small num_embeddings) and few (large).
SHAPES = [(1, 1, 1, 1), (1, 7, 3, 5), (3, 5, 4, 9), (7, 17, 11, 33), (3, 37, 5, 40),
          (5, 19, 97, 17)]
# (shape, dtype, padding_idx): every shape in fp32 with the padding options in turn, two in fp16.
CASES = [pytest.param(shape, torch.float32, pad, id="x".join(map(str, shape)) + f"-fp32-pad{pad}")
         for shape, pad in zip(SHAPES, [None, 0, -1, 2, None, -1])] + [
    pytest.param(SHAPES[3], torch.float16, 0, id="7x17x11x33-fp16-pad0"),
    pytest.param(SHAPES[4], torch.float16, None, id="3x37x5x40-fp16-padNone")]


def _inputs(B, T, N, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, N, (B, T), generator=g).to(device)
    E = torch.randn(B, T, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return idx, E


def per_sample_grads(idx, E, N, padding_idx):
    """g_i = ∇_W Σ_t e_it · F.embedding(idx_i, W)_t (B × N × d, float64), by torch.func."""
    W = torch.zeros(N, E.shape[-1], dtype=torch.float64, device=E.device)

    def inner(W, idx_i, E_i):
        return (F.embedding(idx_i, W, padding_idx=padding_idx) * E_i).sum()

    return torch.func.vmap(torch.func.grad(inner), in_dims=(None, 0, 0))(W, idx, E.double())


def _pad(padding_idx, N):
    return None if padding_idx is None else padding_idx % N


@pytest.mark.parametrize("device,backend", device_backend_params("gram_embedding"))
@pytest.mark.parametrize("shape,dtype,padding_idx", CASES)
def test_gram_matches_float64(device, backend, dtype, shape, padding_idx):
    B, T, N, d = shape
    idx, E = _inputs(*shape, dtype, device)
    idx2, E2 = _inputs(B + 2, T + 3, N, d, dtype, device, seed=1)
    U = per_sample_grads(idx, E, N, _pad(padding_idx, N)).flatten(1)
    U2 = per_sample_grads(idx2, E2, N, _pad(padding_idx, N)).flatten(1)
    Ua = per_sample_grads(idx, E.abs(), N, _pad(padding_idx, N)).flatten(1)
    Ua2 = per_sample_grads(idx2, E2.abs(), N, _pad(padding_idx, N)).flatten(1)
    # fp32 accumulation of at most d-term dots, T·T2 pair terms and T coalescing adds.
    coeff = gamma(d + T * (T + 3) + T + 2) + U32
    K = lk.gram_embedding(idx, E, N, padding_idx, backend=backend)
    assert K.dtype == torch.float32 and K.shape == (B, B)
    assert torch.equal(K, K.T)
    assert_within(K.cpu(), (U @ U.T).cpu(), (coeff * Ua @ Ua.T + 1e-30).cpu(), "K")
    D = lk.gram_embedding(idx, E, N, padding_idx, diagonal=True, backend=backend)
    assert_within(D.cpu(), (U * U).sum(1).cpu(), (coeff * (Ua * Ua).sum(1) + 1e-30).cpu(),
                  "diag K")
    Kc = lk.gram_embedding(idx, E, N, padding_idx, idx2=idx2, E2=E2, backend=backend)
    assert Kc.shape == (B, B + 2)
    assert_within(Kc.cpu(), (U @ U2.T).cpu(), (coeff * Ua @ Ua2.T + 1e-30).cpu(), "cross K")
    idx3, E3 = idx2[:B, :T - 1 if T > 1 else 1], E2[:B, :T - 1 if T > 1 else 1]
    U3 = per_sample_grads(idx3, E3, N, _pad(padding_idx, N)).flatten(1)
    Ua3 = per_sample_grads(idx3, E3.abs(), N, _pad(padding_idx, N)).flatten(1)
    Dc = lk.gram_embedding(idx, E, N, padding_idx, idx2=idx3, E2=E3, diagonal=True,
                           backend=backend)
    assert_within(Dc.cpu(), (U * U3).sum(1).cpu(), (coeff * (Ua * Ua3).sum(1) + 1e-30).cpu(),
                  "cross diag K")


@pytest.mark.parametrize("device,backend", device_backend_params("weighted_sum_embedding"))
@pytest.mark.parametrize("shape,dtype,padding_idx", CASES)
def test_weighted_sum_matches_float64(device, backend, dtype, shape, padding_idx):
    B, T, N, d = shape
    idx, E = _inputs(*shape, dtype, device)
    G = per_sample_grads(idx, E, N, _pad(padding_idx, N))
    Ga = per_sample_grads(idx, E.abs(), N, _pad(padding_idx, N))
    g = torch.Generator().manual_seed(5)
    c = torch.randn(B, generator=g, dtype=torch.float64).to(device).float()
    C = torch.randn(B, 3, generator=g, dtype=torch.float64).to(device).float()
    coeff = gamma(B * T + 1) + U32
    W = lk.weighted_sum_embedding(idx, E, c, N, padding_idx, backend=backend)
    assert W.dtype == torch.float32 and W.shape == (N, d)
    assert_within(W.cpu(), torch.einsum("bnd,b->nd", G, c.double()).cpu(),
                  (coeff * torch.einsum("bnd,b->nd", Ga, c.double().abs()) + 1e-30).cpu(), "U c")
    Wm = lk.weighted_sum_embedding(idx, E, C, N, padding_idx, backend=backend)
    assert Wm.shape == (3, N, d)
    assert_within(Wm.cpu(), torch.einsum("bnd,bm->mnd", G, C.double()).cpu(),
                  (coeff * torch.einsum("bnd,bm->mnd", Ga, C.double().abs()) + 1e-30).cpu(),
                  "U C")


@pytest.mark.parametrize("device,backend", device_backend_params("project_embedding"))
@pytest.mark.parametrize("shape,dtype,padding_idx", CASES)
def test_project_matches_float64(device, backend, dtype, shape, padding_idx):
    B, T, N, d = shape
    idx, E = _inputs(*shape, dtype, device)
    U = per_sample_grads(idx, E, N, _pad(padding_idx, N)).flatten(1)
    Ua = per_sample_grads(idx, E.abs(), N, _pad(padding_idx, N)).flatten(1)
    g = torch.Generator().manual_seed(6)
    V = torch.randn(3, N, d, generator=g, dtype=torch.float64).to(device).float()
    coeff = gamma(T * d + 1) + U32
    P = lk.project_embedding(idx, E, V[0], padding_idx, backend=backend)
    assert P.dtype == torch.float32 and P.shape == (B,)
    Vf = V.double().flatten(1)
    assert_within(P.cpu(), (U @ Vf[0]).cpu(), (coeff * Ua @ Vf[0].abs() + 1e-30).cpu(), "Uᵀ v")
    Pm = lk.project_embedding(idx, E, V, padding_idx, backend=backend)
    assert Pm.shape == (B, 3)
    assert_within(Pm.cpu(), (U @ Vf.T).cpu(), (coeff * Ua @ Vf.abs().T + 1e-30).cpu(), "Uᵀ V")


@pytest.mark.parametrize("device,backend", device_backend_params("gram_embedding"))
def test_noncontiguous_inputs(device, backend):
    B, T, N, d = 5, 9, 6, 13
    idx_big, E_big = _inputs(B, 2 * T, N, 2 * d, torch.float32, device, seed=4)
    idx = idx_big[:, ::2]
    E = E_big.transpose(1, 2).contiguous().transpose(1, 2)[:, ::2, ::2]
    assert not idx.is_contiguous() and not E.is_contiguous()
    U = per_sample_grads(idx, E, N, 2).flatten(1)
    Ua = per_sample_grads(idx, E.abs(), N, 2).flatten(1)
    coeff = gamma(d + T * T + T + 2) + U32
    K = lk.gram_embedding(idx, E, N, 2, backend=backend)
    assert_within(K.cpu(), (U @ U.T).cpu(), (coeff * Ua @ Ua.T + 1e-30).cpu(), "K")
    c = torch.randn(2 * B, dtype=torch.float32, device=device)[::2]
    W = lk.weighted_sum_embedding(idx, E, c, N, 2, backend=backend)
    Wa = (Ua.T @ c.double().abs()).view(N, d)
    assert_within(W.cpu(), (U.T @ c.double()).view(N, d).cpu(),
                  (gamma(B * T + 1) * Wa + 1e-30).cpu(), "U c")
    V = torch.randn(d, N, dtype=torch.float32, device=device).T
    P = lk.project_embedding(idx, E, V, 2, backend=backend)
    assert_within(P.cpu(), (U @ V.double().flatten()).cpu(),
                  (gamma(T * d + 1) * Ua @ V.double().abs().flatten() + 1e-30).cpu(), "Uᵀ v")


def test_float64_reference_is_exact_to_rounding():
    B, T, N, d = 7, 11, 5, 6
    idx, E = _inputs(B, T, N, d, torch.float64)
    U = per_sample_grads(idx, E, N, 3).flatten(1)
    K = lk.gram_embedding(idx, E, N, 3, backend="reference")
    assert K.dtype == torch.float64
    torch.testing.assert_close(K, U @ U.T, rtol=1e-13, atol=1e-13)
    c = torch.randn(B, 2, dtype=torch.float64)
    torch.testing.assert_close(lk.weighted_sum_embedding(idx, E, c, N, 3, backend="reference"),
                               (U.T @ c).T.view(2, N, d), rtol=1e-13, atol=1e-13)
    V = torch.randn(2, N, d, dtype=torch.float64)
    torch.testing.assert_close(lk.project_embedding(idx, E, V, 3, backend="reference"),
                               U @ V.flatten(1).T, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("pair_block", [1, 50, 1 << 22], ids=["rows", "chunks", "one-GEMM"])
@pytest.mark.parametrize("padding_idx", [None, 1])
def test_reference_gram_routes(monkeypatch, pair_block, padding_idx):
    """The reference's coalesced route (chunked by the pair-block size) and its one-GEMM route
    for small problems give the same float64 Gram."""
    import lowrank_kernels.reference.gram_embedding as reference

    monkeypatch.setattr(reference, "_PAIR_BLOCK", pair_block)
    idx, E = _inputs(6, 9, 5, 7, torch.float64)
    idx2, E2 = _inputs(4, 3, 5, 7, torch.float64, seed=2)
    U = per_sample_grads(idx, E, 5, padding_idx).flatten(1)
    U2 = per_sample_grads(idx2, E2, 5, padding_idx).flatten(1)
    K = reference.gram_embedding(idx, E, 5, padding_idx)
    assert torch.equal(K, K.T)
    torch.testing.assert_close(K, U @ U.T, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(reference.gram_embedding(idx, E, 5, padding_idx, idx2, E2),
                               U @ U2.T, rtol=1e-13, atol=1e-13)


def test_auto_backend_float32_and_float64():
    idx, E = _inputs(4, 5, 6, 7)
    U = per_sample_grads(idx, E, 6, None).flatten(1)
    torch.testing.assert_close(lk.gram_embedding(idx, E, 6).double(), U @ U.T, rtol=1e-5,
                               atol=1e-5)
    assert lk.gram_embedding(idx, E.double(), 6).dtype == torch.float64


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_bf16_on_gpu(backend):
    B, T, N, d = 9, 33, 7, 40
    idx, E = _inputs(B, T, N, d, torch.bfloat16, "cuda")
    U = per_sample_grads(idx, E, N, 1).flatten(1)
    Ua = per_sample_grads(idx, E.abs(), N, 1).flatten(1)
    K = lk.gram_embedding(idx, E, N, 1, backend=backend)
    assert_within(K.cpu(), (U @ U.T).cpu(), ((gamma(d + T * T + T + 2) + U32) * Ua @ Ua.T).cpu(),
                  "bf16 K")


def test_opcheck():
    idx, E = _inputs(3, 4, 5, 6)
    idx2, E2 = _inputs(2, 3, 5, 6, seed=1)
    c, V = torch.randn(3, 2), torch.randn(5, 6)
    for backend in (None, "reference"):
        torch.library.opcheck(torch.ops.lowrank_kernels.gram_embedding.default,
                              (idx, E, 5, 1), {"idx2": idx2, "E2": E2})
        torch.library.opcheck(torch.ops.lowrank_kernels.gram_embedding.default,
                              (idx, E, 5, None), {"diagonal": True})
        torch.library.opcheck(torch.ops.lowrank_kernels.weighted_sum_embedding.default,
                              (idx, E, c, 5, 0))
        torch.library.opcheck(torch.ops.lowrank_kernels.project_embedding.default,
                              (idx, E, V, -1))


def test_torch_compile_fullgraph_traces():
    idx, E = _inputs(3, 4, 5, 6)
    v = torch.randn(5, 6)

    def f(i, e):
        return lk.gram_embedding(i, e, 5, 0).sum(1) + lk.project_embedding(i, e, v)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(idx, E), f(idx, E))


# ---- bad input: every error names the argument ----------------------------------------

@pytest.mark.parametrize("backend", [None, "reference", "triton"])
def test_bad_input_errors_name_the_argument(backend):
    idx, E = _inputs(3, 4, 5, 6)
    c, V = torch.randn(3), torch.randn(5, 6)
    gram, wsum, proj = lk.gram_embedding, lk.weighted_sum_embedding, lk.project_embedding
    with pytest.raises(TypeError, match=r"gram_embedding: idx must be an int64"):
        gram(idx.int(), E, 5, backend=backend)
    with pytest.raises(TypeError, match=r"weighted_sum_embedding: idx must be an int64"):
        wsum(idx.float(), E, c, 5, backend=backend)
    with pytest.raises(ValueError, match=r"idx must be a 2-D tensor"):
        gram(idx[0], E, 5, backend=backend)
    with pytest.raises(ValueError, match=r"E must be a 3-D tensor"):
        proj(idx, E[0], V, backend=backend)
    with pytest.raises(ValueError, match=r"idx and E must have the same \(B, T\)"):
        gram(idx, E[:, :3], 5, backend=backend)
    with pytest.raises(TypeError, match=r"E must have a floating dtype"):
        gram(idx, idx[..., None], 5, backend=backend)
    # index ranges are asserted on the device (torch._assert_async: no host sync; on a GPU the
    # stream stops with this message, as torch's own embedding does)
    with pytest.raises(RuntimeError, match=r"gram_embedding: idx must hold indices in \[0, 4\)"):
        gram(idx.clamp(max=4) * 0 + 4, E, 4, backend=backend)
    with pytest.raises(RuntimeError, match=r"idx2 must hold indices in \[0, 5\)"):
        gram(idx, E, 5, idx2=idx - 1, E2=E, backend=backend)
    with pytest.raises(RuntimeError,
                       match=r"project_embedding: idx must hold indices in \[0, 3\)"):
        proj(idx, E, V[:3], backend=backend)
    with pytest.raises(ValueError, match=r"padding_idx must be in .* = \[-5, 5\), got 5"):
        gram(idx, E, 5, 5, backend=backend)
    with pytest.raises(ValueError, match=r"num_embeddings must be positive"):
        wsum(idx, E, c, 0, backend=backend)
    with pytest.raises(ValueError, match=r"idx2 and E2 must be given together"):
        gram(idx, E, 5, idx2=idx, backend=backend)
    with pytest.raises(ValueError, match=r"E and E2 must have the same dtype"):
        gram(idx, E, 5, idx2=idx, E2=E.double(), backend=backend)
    with pytest.raises(ValueError, match=r"E and E2 must have the same embedding dim"):
        gram(idx, E, 5, idx2=idx, E2=E[..., :4], backend=backend)
    with pytest.raises(ValueError, match=r"idx and idx2 must have the same batch size"):
        gram(idx, E, 5, idx2=idx[:2], E2=E[:2], diagonal=True, backend=backend)
    with pytest.raises(ValueError, match=r"idx and c must have the same batch size"):
        wsum(idx, E, c[:2], 5, backend=backend)
    with pytest.raises(ValueError, match=r"c must be a 1 or 2-D tensor"):
        wsum(idx, E, c[:, None, None], 5, backend=backend)
    with pytest.raises(TypeError, match=r"c must have a floating dtype"):
        wsum(idx, E, idx[:, 0], 5, backend=backend)
    with pytest.raises(ValueError, match=r"E and V must have the same embedding dim"):
        proj(idx, E, V[:, :5], backend=backend)
    with pytest.raises(ValueError, match=r"V must be a 2 or 3-D tensor"):
        proj(idx, E, V[0], backend=backend)
    bad = E.clone()
    bad[1, 2, 3] = float("nan")
    with lk.strict(), pytest.raises(lk.NonFiniteError, match=r"gram_embedding: E contains non-finite"):
        gram(idx, bad, 5, backend=backend)
    with lk.strict(), pytest.raises(lk.NonFiniteError, match=r"project_embedding: V contains non-finite"):
        proj(idx, E, V * float("inf"), backend=backend)
