"""Randomized SVD and symmetric eigendecomposition on top of range_finder (Halko,
Martinsson & Tropp 2011, Alg. 5.1 and 5.3)."""
import torch

from .orthonormalize import _nonfinite, _orthonormalize
from .range_finder import (LinearOperator, _is_int, check_matrix, dense_operator,
                           range_finder, resolve_ortho)


def _resolve_rank(op, k, q, oversample, niter, power_iters):
    """(returned rank r, oversample p, power iterations) from our names or torch's."""
    if (k is None) == (q is None):
        raise ValueError(f"{op}: give exactly one of k (rank, sketch k + oversample) or q "
                         f"(torch.svd_lowrank's sketch size, no oversampling); got k={k!r}, "
                         f"q={q!r}")
    if niter is not None and power_iters is not None and niter != power_iters:
        raise ValueError(f"{op}: niter and power_iters are the same thing; got niter={niter!r}"
                         f", power_iters={power_iters!r}")
    for name, value in (("niter", niter), ("power_iters", power_iters)):
        if value is not None and (not _is_int(value) or value < 0):
            raise ValueError(f"{op}: {name} must be None or an int >= 0, got {value!r}")
    if k is not None and (not _is_int(k) or k < 1):
        raise ValueError(f"{op}: k must be a positive int, got {k!r}")
    iters = niter if niter is not None else (power_iters if power_iters is not None else 2)
    if q is not None:
        if not _is_int(q) or q < 1:
            raise ValueError(f"{op}: q must be a positive int, got {q!r}")
        return q, 0, iters
    return k, oversample, iters


def randomized_svd(M, k: int | None = None, *, q: int | None = None, niter: int | None = None,
                   oversample: int = 10, power_iters: int | None = None,
                   dist: str = "gaussian", seed: int = 0, ortho: str = "auto",
                   backend: str | None = None, return_stats: bool = False):
    """Rank-r truncated SVD M ≈ U diag(S) Vᵀ from a randomized range finder:

        Q = range_finder(M, r, oversample, power_iters)      (m × l)
        Bᵀ = Mᵀ Q = Q₂ R₂ (orthonormalize),  R₂ᵀ = Ũ S Ṽᵀ (l × l SVD)
        U = Q Ũ[:, :r],  V = Q₂ Ṽ[:, :r],  S = S[:r]            (since B = QᵀM = Ũ S (Q₂Ṽ)ᵀ)

    Drop-in for torch.svd_lowrank(A, q=6, niter=2): randomized_svd(A, q=6, niter=2) sketches
    q columns with niter power iterations and returns all q triplets (U m×q, S q, V n×q, so
    A ≈ U diag(S) Vᵀ); torch's mean-centering argument M is not supported (subtract the mean
    first). Our names: k = rank returned, sketch size k + oversample, power_iters ≡ niter
    (default 2). M: dense float32/float64 or a LinearOperator (see range_finder). The first
    sketch uses Ω_ij = f(seed, i, j) (lowrank_kernels.sketch_omega). Singular values in
    descending order. Non-finite input raises lowrank_kernels.NonFiniteError naming M (or
    the callback whose result was not finite). Returns (U, S, V) [, SketchStats]."""
    r, p, iters = _resolve_rank("randomized_svd", k, q, oversample, niter, power_iters)
    m, n, _, device = check_matrix("randomized_svd", M)
    ortho = resolve_ortho(ortho, device)
    Q, stats = range_finder(M, r, oversample=p, power_iters=iters, dist=dist, seed=seed,
                            ortho=ortho, backend=backend, return_stats=True)
    operator = isinstance(M, LinearOperator)
    Bt = (M if operator else dense_operator(M)).T.matmul(Q)  # n × l
    name = ("M.rmatmul(Q)" if M.rmatmul is not None else "M.matmul(Q)") if operator else "Mᵀ Q"
    Q2, R2, info = _orthonormalize(Bt, ortho, True, True, 0.5, "randomized_svd", name)
    stats.orthonormalizations.append(info)
    Ut, S, Vt_h = torch.linalg.svd(R2.mT)
    r = min(r, Q.shape[1])
    U, V = Q @ Ut[:, :r], Q2 @ Vt_h.mT[:, :r]
    out = (U, S[:r], V)
    return (*out, stats) if return_stats else out


def randomized_eigh(M, k: int, *, oversample: int = 10, power_iters: int | None = None,
                    niter: int | None = None, dist: str = "gaussian", seed: int = 0,
                    ortho: str = "auto", backend: str | None = None,
                    return_stats: bool = False):
    """The k largest eigenpairs of a symmetric positive semi-definite M (n × n) by Rayleigh–
    Ritz on a randomized range:

        Q = range_finder(M, k, oversample, power_iters),  T = Qᵀ M Q (symmetrized),
        T = W diag(λ) Wᵀ,  evecs = Q W[:, top k],  evals = λ[top k]

    M: dense float32/float64 (only its products are used, M is assumed symmetric) or a
    LinearOperator (rmatmul may be omitted). power_iters ≡ niter (default 2), as in
    randomized_svd. Returns (evals descending (k,), evecs (n × k))
    [, SketchStats]. For PSD M the top eigenpairs are its top singular triplets, so the
    accuracy is that of randomized_svd with the same options."""
    _, _, iters = _resolve_rank("randomized_eigh", k, None, oversample, niter, power_iters)
    m, n, _, _ = check_matrix("randomized_eigh", M)
    if m != n:
        raise ValueError(f"randomized_eigh: M must be square (symmetric), got shape {(m, n)}")
    Q, stats = range_finder(M, k, oversample=oversample, power_iters=iters, dist=dist,
                            seed=seed, ortho=ortho, backend=backend, return_stats=True)
    operator = isinstance(M, LinearOperator)
    MQ = M.matmul(Q) if operator else M @ Q
    T = Q.mT @ MQ
    if not bool(torch.isfinite(T).all()):  # l × l: one small sync
        raise _nonfinite("randomized_eigh", "M.matmul(Q)" if operator else "M Q")
    evals, W = torch.linalg.eigh((T + T.mT) / 2)
    top = min(k, Q.shape[1])
    evals, W = evals.flip(0)[:top], W.flip(1)[:, :top]
    out = (evals, Q @ W)
    return (*out, stats) if return_stats else out


