"""gram_linear at T = 1 with a bias (a linear layer, one token per sample):

    K = (A Aᵀ + 1) ⊙ (E Eᵀ)        and its diagonal  diag K_i = (‖a_i‖² + 1) ‖e_i‖²,

ours (lowrank_kernels.gram_linear, backend auto) against the best plain PyTorch: two GEMMs
and an in-place add and product for K; row norms for the diagonal, next to what the row norms
replace: the diagonal of the dense K, and per-sample gradient norms from the gradients
themselves (one bmm of outer products e_i [a_i, 1]ᵀ).
"""
import torch
from common import DEVICE, FULL, MAX_BYTES, Case, Setup, baseline, dtype_name, ours

import lowrank_kernels as lk

# (B, d_in, d_out): a linear layer at T = 1.
SHAPES = [(256, 4096, 4096), (1024, 1024, 1024), (128, 768, 3072), (64, 512, 512)]
if not FULL:
    SHAPES = [(256, 1024, 1024), (128, 768, 768), (64, 512, 512)]
# The per-sample-gradient baseline of the diagonal materializes B·d_out·(d_in + 1) floats: up
# to this many bytes (beyond, seconds a call).
_PER_SAMPLE_BYTES = 256 << 20
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _inputs(B, d_in, d_out, dtype):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(B, d_in, generator=g).to(DEVICE, dtype)
    E = torch.randn(B, d_out, generator=g).to(DEVICE, dtype)
    return A, E


def _gram(B, d_in, d_out, dtype):
    def build():
        A, E = _inputs(B, d_in, d_out, dtype)

        def two_gemms():  # .float(): a no-op in fp32; the output is fp32 for bf16 inputs
            return (A @ A.T).float().add_(1).mul_((E @ E.T).float())

        return Setup([ours("", lambda: lk.gram_linear(A, E, True)),
                      baseline("torch (A@Aᵀ+1)*(E@Eᵀ)", two_gemms)],
                     # the upper triangle: B(B+1)/2 entries, 2(d_in + d_out) flops each
                     flops=B * (B + 1) * (d_in + d_out),
                     bytes_moved=(A.numel() + E.numel()) * A.element_size() + B * B * 4,
                     dtype=dtype_name(dtype), tol=1e-4 if dtype == torch.float32 else 2e-2)
    return build


def _diagonal(B, d_in, d_out, dtype):
    def build():
        A, E = _inputs(B, d_in, d_out, dtype)

        def square_sum():
            return A.float().square().sum(1).add_(1).mul_(E.float().square().sum(1))

        def vector_norm():
            na = torch.linalg.vector_norm(A, dim=1, dtype=torch.float32)
            ne = torch.linalg.vector_norm(E, dim=1, dtype=torch.float32)
            return na.square_().add_(1).mul_(ne.square_())

        def einsum():
            a, e = A.float(), E.float()
            return torch.einsum("ij,ij->i", a, a).add_(1).mul_(torch.einsum("ij,ij->i", e, e))

        def dense_diagonal():  # the diagonal of the dense K: two GEMMs, then diag
            a, e = A.float(), E.float()
            return torch.diagonal((a @ a.T).add_(1).mul_(e @ e.T)).clone()

        def per_sample_norms():  # ‖g_i‖² of the per-sample gradients e_i [a_i, 1]ᵀ (one bmm)
            a1 = torch.cat([A.float(), A.new_ones(B, 1, dtype=torch.float32)], 1)
            G = torch.bmm(E.float()[:, :, None], a1[:, None, :])
            return G.flatten(1).square().sum(1)

        bases = [baseline("torch square().sum(1)", square_sum),
                 baseline("torch linalg.vector_norm", vector_norm),
                 baseline("torch einsum ij,ij->i", einsum),
                 baseline("torch diag((A@Aᵀ+1)*(E@Eᵀ))", dense_diagonal)]
        need, notes = B * d_out * (d_in + 1) * 4, {}
        if need <= min(MAX_BYTES, _PER_SAMPLE_BYTES):
            bases.append(baseline("torch bmm per-sample + norms", per_sample_norms))
        else:
            notes["torch bmm per-sample + norms left out"] = f"needs {need / 2**20:.0f} MiB"
        return Setup([ours("", lambda: lk.gram_linear(A, E, True, diagonal=True))] + bases,
                     notes=notes,
                     flops=2 * B * (d_in + d_out),
                     bytes_moved=(A.numel() + E.numel()) * A.element_size() + B * 4,
                     dtype=dtype_name(dtype), tol=1e-4 if dtype == torch.float32 else 2e-2)
    return build


CASES = []
for _dtype in DTYPES:
    for _B, _i, _o in SHAPES:
        _shape = f"T=1 bias B={_B} d_in={_i} d_out={_o} {dtype_name(_dtype)}"
        CASES.append(Case("gram_linear", _shape, _gram(_B, _i, _o, _dtype)))
        CASES.append(Case("gram_linear diagonal", _shape, _diagonal(_B, _i, _o, _dtype)))
