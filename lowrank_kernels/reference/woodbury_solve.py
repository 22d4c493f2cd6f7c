"""Reference of woodbury_solve: X = (K + λ'I)⁻¹ R through torch.linalg.cholesky_ex and
torch.cholesky_solve, with the op's whole contract (lower triangle only, jitter ladder, info
codes, zeros for failed members). Pure PyTorch, float32 or float64, any device: the test
oracle and the fallback. The contract is documented on lowrank_kernels.woodbury_solve.
"""
import torch

INFO_NONFINITE = -1  # NaN/Inf in the read (lower) triangle of K or in R
INFO_OVERFLOW = -2   # factored, but the solution overflowed (Inf/NaN): X zeroed
INFO_BAD_DAMPING = -3  # the damping is negative, NaN or Inf
DEFAULT_JITTER = {torch.float32: 1e-6, torch.float64: 1e-12}
DEFAULT_MAX_TRIES = 4


def default_jitter(dtype: torch.dtype) -> float:
    """The first rung of the jitter ladder relative to mean|K_ii|: 1e-6 (fp32), 1e-12 (fp64)."""
    return DEFAULT_JITTER[dtype]


def batched(K, damping, R):
    """(K b×n×n, damping (b,) in K's dtype on K's device (possibly strided: a view of the
    argument where no copy is needed), R b×n×r, unbatch) for any accepted shapes:
    K (b, n, n) with R (b, n, r) or (b, n); K (n, n) with R (n, r) or (n,); damping a float,
    a 0-d tensor or a (b,) tensor. unbatch(X, info, used) gives back R's shape for X and
    shape () (unbatched) or (b,) for info and used."""
    is_batched = K.dim() == 3
    Kb = K if is_batched else K[None]
    vector_rhs = R.dim() == K.dim() - 1
    Rb = R.unsqueeze(-1) if vector_rhs else R
    if not is_batched:
        Rb = Rb[None]
    b = Kb.shape[0]
    if isinstance(damping, torch.Tensor) and not (damping.dim() == 0 and damping.is_cpu):
        lam = damping.to(device=K.device, dtype=K.dtype)  # a view where it can be, else a copy
        if lam.dim() == 0 or lam.shape[0] != b:
            lam = lam.expand(b)
    elif K.is_cpu and isinstance(damping, torch.Tensor) and damping.dtype == K.dtype:
        lam = damping.expand(b)  # a CPU scalar for a CPU K: a view (stride 0), no copy
    else:  # a float or a CPU scalar: filled on K's device, no host-device copy
        lam = torch.full((b,), float(damping), dtype=K.dtype, device=K.device)

    def unbatch(X, info, used):
        if vector_rhs:
            X = X.squeeze(-1)
        if not is_batched:
            X, info, used = X[0], info[0], used[0]
        return X, info, used

    return Kb, lam, Rb, unbatch


def _jitter_shift(jitter, p, scale, dtype):
    """(jitter·s)·10^p in dtype, the multiplications by 10 one at a time (as the kernels)."""
    shift = torch.tensor(jitter, dtype=dtype, device=scale.device) * scale.to(dtype)
    for _ in range(p):
        shift = shift * 10
    return shift


def woodbury_solve(K: torch.Tensor, damping, R: torch.Tensor, jitter: float | None = None,
                   max_tries: int = DEFAULT_MAX_TRIES):
    """(X, info, damping_used): X = (K + λ'I)⁻¹ R read from the lower triangle of K, λ' = λ or
    the first rung λ + (jitter·s)·10^p, p = 0 … max_tries−1, s = mean|K_ii| (1 if 0), whose
    Cholesky factorization succeeds. See lowrank_kernels.woodbury_solve for the codes."""
    Kb, lam, Rb, unbatch = batched(K, damping, R)
    dtype, (b, n, _) = Kb.dtype, Kb.shape
    jitter = default_jitter(dtype) if jitter is None else float(jitter)
    lower = torch.ones(n, n, dtype=torch.bool, device=Kb.device).tril()
    Kl = torch.where(lower, Kb, torch.zeros((), dtype=dtype, device=Kb.device))
    bad_damping = ~((lam >= 0) & torch.isfinite(lam))
    nonfinite = ~torch.isfinite(Kl).all(-1).all(-1) | ~torch.isfinite(Rb).flatten(1).all(-1)
    nonfinite = nonfinite & ~bad_damping
    given, lam = lam, torch.where(bad_damping, torch.zeros((), dtype=dtype, device=lam.device), lam)
    Kl = torch.where(nonfinite[:, None, None], torch.zeros((), dtype=dtype, device=Kb.device), Kl)
    eye = torch.eye(n, dtype=dtype, device=Kb.device)
    L, info = torch.linalg.cholesky_ex(Kl + lam[:, None, None] * eye)
    info = info.to(torch.int32)
    used = lam.clone()
    failed = (info > 0) & ~nonfinite & ~bad_damping
    if jitter > 0 and max_tries > 0 and bool(failed.any()):
        scale = Kb.diagonal(dim1=-2, dim2=-1).double().abs().sum(-1) / max(n, 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        for p in range(max_tries):
            idx = failed.nonzero().flatten()
            if idx.numel() == 0:
                break
            lam_p = lam[idx] + _jitter_shift(jitter, p, scale[idx], dtype)
            L_p, info_p = torch.linalg.cholesky_ex(Kl[idx] + lam_p[:, None, None] * eye)
            L[idx], info[idx], used[idx] = L_p, info_p.to(torch.int32), lam_p
            failed[idx] = info_p > 0
    info = torch.where(nonfinite, torch.full_like(info, INFO_NONFINITE), info)
    info = torch.where(bad_damping, torch.full_like(info, INFO_BAD_DAMPING), info)
    used = torch.where(bad_damping, given, used)
    ok = info == 0
    L = torch.where(ok[:, None, None], L, eye)  # failed factors are never used
    X = torch.cholesky_solve(Rb, L)
    overflow = ok & ~torch.isfinite(X).flatten(1).all(-1)
    info = torch.where(overflow, torch.full_like(info, INFO_OVERFLOW), info)
    X = torch.where((info == 0)[:, None, None], X, torch.zeros((), dtype=dtype, device=X.device))
    return unbatch(X.contiguous(), info, used)
