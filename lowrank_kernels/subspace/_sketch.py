"""The orthonormalization and randomized SVD that subspace and compress use: those of
lowrank_kernels.sketch."""
import torch

try:
    from ..sketch import orthonormalize, randomized_svd  # noqa: F401
except ImportError:  # lowrank_kernels.sketch not there yet
    def orthonormalize(Y):
        return torch.linalg.qr(Y)[0]

    def randomized_svd(M, k, oversample=10, n_iter=2, seed=None):
        U, S, V = torch.svd_lowrank(M, q=min(k + oversample, *M.shape), niter=n_iter)
        return U[:, :k], S[:k], V[:, :k]
