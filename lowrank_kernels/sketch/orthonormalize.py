"""Orthonormalization of a tall m × l block: Cholesky-QR2 with a Householder fallback."""
import dataclasses
import math

import torch

METHODS = ("cholqr2", "householder")


@dataclasses.dataclass
class OrthoInfo:
    """What orthonormalize did: `method` is the one that produced Q ('cholqr2' or
    'householder'); `fallback` is True when Cholesky-QR2 was asked for and Householder QR
    was taken instead, with `reason`; `orthogonality_loss` = ‖Q₁ᵀQ₁ − I‖_F after the first
    Cholesky-QR pass (NaN when that pass failed or was not run)."""
    method: str
    fallback: bool = False
    reason: str = ""
    orthogonality_loss: float = float("nan")


def _cholqr_pass(Y):
    """Q = Y R⁻¹ with R = chol(G), G = YᵀY (upper); info ≠ 0 when the Cholesky broke down."""
    G = Y.mT @ Y
    R, info = torch.linalg.cholesky_ex(G, upper=True)
    Q = torch.linalg.solve_triangular(R, Y, upper=True, left=False)
    return Q, R, G, info


def orthonormalize(Y: torch.Tensor, *, method: str = "cholqr2", return_r: bool = False,
                   return_info: bool = False, max_loss: float = 0.5):
    """Q with orthonormal columns and R upper triangular such that Y = Q R (Y: m × l, m ≥ l,
    float32 or float64).

    method='cholqr2' (Cholesky-QR2, Yamamoto et al. 2015): two passes of
        G = YᵀY,  R₁ = chol(G),  Q₁ = Y R₁⁻¹;   then the same on Q₁: Q = Q₁ R₂⁻¹,  R = R₂ R₁.
    It costs two Gram GEMMs and two triangular solves (no Householder panel factorization) and
    gives ‖QᵀQ − I‖ = O(u) when κ(Y) ≲ u^(-1/2). It falls back to Householder QR
    (torch.linalg.qr) when a Cholesky breaks down (cholesky_ex info ≠ 0: Y numerically rank
    deficient) or when the condition estimate of the first pass is too large: the Gram of Q₁,
    computed by the second pass anyway, gives η = ‖Q₁ᵀQ₁ − I‖_F ≥ ‖Q₁ᵀQ₁ − I‖₂, hence
    κ(Q₁)² ≤ (1 + η)/(1 − η); η > max_loss (default ½, κ(Q₁) ≤ √3) means the first pass lost
    too much orthogonality (κ(Y)² u ≳ 1) for the second one to repair. The decision costs one
    device→host sync. method='householder': torch.linalg.qr only.
    A Y with NaN or Inf raises lowrank_kernels.NonFiniteError (a ValueError) naming Y, never
    a NaN Q (the check rides on the decision's sync; one sync for 'householder').

    Returns Q [, R] [, OrthoInfo] (R when return_r, the info when return_info)."""
    if method not in METHODS:
        raise ValueError(f"orthonormalize: method must be one of {METHODS}, got {method!r}")
    if not isinstance(Y, torch.Tensor):
        raise TypeError(f"orthonormalize: Y must be a torch.Tensor, got {type(Y).__name__}")
    if Y.dim() != 2:
        raise ValueError(f"orthonormalize: Y must be a 2-D tensor (m x l), got shape "
                         f"{tuple(Y.shape)}")
    if Y.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"orthonormalize: Y must be float32 or float64, got {Y.dtype}")
    if Y.shape[0] < Y.shape[1]:
        raise ValueError(f"orthonormalize: Y must be tall (m >= l), got shape {tuple(Y.shape)}")
    for name, flag in (("return_r", return_r), ("return_info", return_info)):
        if not isinstance(flag, bool):
            raise TypeError(f"orthonormalize: {name} must be a bool, got "
                            f"{type(flag).__name__} {flag!r}")
    if (isinstance(max_loss, bool) or not isinstance(max_loss, (int, float))
            or not 0 < max_loss < 1):
        raise ValueError(f"orthonormalize: max_loss must be a number in (0, 1), got "
                         f"{max_loss!r}")
    return _orthonormalize(Y, method, return_r, return_info, max_loss, "orthonormalize", "Y")


def _nonfinite(op, name):
    """The error for a non-finite input: lowrank_kernels.NonFiniteError (a ValueError and a
    FloatingPointError) naming the argument (imported when raised: lowrank_kernels imports
    this module)."""
    import lowrank_kernels
    return lowrank_kernels.NonFiniteError(
        f"{op}: {name} contains non-finite values (NaN or Inf)", op, name)


def _householder(Y, op, name):
    """(Q, R) by torch.linalg.qr: geqrf + orgqr in one call (faster than torch.geqrf +
    householder_product without R: measured, MKL, 1 thread, m = 384-512, l = 26-74,
    column-major Y: 2-9%); a non-finite Y raises naming `name` (one sync: sum(Y); NaN/Inf
    propagate, and a finite Y whose sum overflows is checked exactly)."""
    if not math.isfinite(Y.sum()) and not bool(torch.isfinite(Y).all()):
        raise _nonfinite(op, name)
    return torch.linalg.qr(Y)


def _orthonormalize(Y, method, return_r, return_info, max_loss, op, name):
    """orthonormalize without the argument checks; a non-finite Y raises naming `name`
    (for Cholesky-QR2 the finiteness flag rides on the sync its decision makes anyway)."""
    if method == "householder":
        Q, R = _householder(Y, op, name)
        info = OrthoInfo("householder")
    else:
        Q, R, info = _cholqr2(Y, max_loss, op, name)
    if return_r:
        return (Q, R, info) if return_info else (Q, R)
    return (Q, info) if return_info else Q


def _cholqr2(Y, max_loss, op, name):
    """(Q, R, OrthoInfo) by Cholesky-QR2, or by Householder QR when it breaks down (see
    orthonormalize)."""
    info = OrthoInfo(method="cholqr2")
    Q1, R1, _, info1 = _cholqr_pass(Y)
    Q, R2, G2, info2 = _cholqr_pass(Q1)  # G2 = Q₁ᵀQ₁
    eye = torch.eye(Y.shape[1], dtype=Y.dtype, device=Y.device)
    loss = torch.linalg.matrix_norm(G2 - eye)
    # sum(Y): NaN/Inf propagate; a finite Y whose sum overflows is checked exactly
    flags = torch.stack([info1.to(loss.dtype), info2.to(loss.dtype), loss,
                         Y.sum().to(loss.dtype)]).tolist()
    if not math.isfinite(flags[3]) and not bool(torch.isfinite(Y).all()):
        raise _nonfinite(op, name)
    info.orthogonality_loss = flags[2] if flags[0] == 0 else float("nan")
    if flags[0] != 0 or flags[1] != 0:
        info.fallback, info.reason = True, "Cholesky of the Gram matrix broke down"
    elif not flags[2] <= max_loss:
        info.fallback = True
        info.reason = (f"first pass lost orthogonality: ‖Q₁ᵀQ₁ − I‖_F = {flags[2]:.3g} "
                       f"> {max_loss}")
    else:
        return Q, R2 @ R1, info
    info.method = "householder"
    Q, R = torch.linalg.qr(Y)  # Y is finite (checked above)
    return Q, R, info
