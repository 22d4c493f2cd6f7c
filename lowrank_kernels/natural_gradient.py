"""The damped natural-gradient solve in sample space — the one path ng_solve, FNGD and SENG
take.

With U = [g_1 … g_B] the per-sample gradients (D × B), F = U Uᵀ / B the empirical Fisher and
K = Uᵀ U the B × B Gram, the Woodbury identity gives, for λ > 0,

    (F + λI)⁻¹ ḡ = U c,   c = (K + λB·I)⁻¹ 1                  (ḡ = U 1 / B, the mean gradient)
    (F + λI)⁻¹ v = (v − U (K + λB·I)⁻¹ Uᵀ v) / λ             (any v)

so the D × D solve becomes one projection Uᵀ v, a batched B × B Woodbury solve and one
weighted sum — per block of parameters (block-diagonal F: one block per module, or one for
the whole model), all blocks in one batched solve. A parameter's per-sample gradients come as
its `Factors` (Capture.factors(), or factors an optimizer kept); the blocks are
Capture.blocks(by). Nothing here synchronizes with the device: failures are 0-d tensors.
"""
from typing import NamedTuple

import torch

from .capture import Capture
from .ops.woodbury_solve import woodbury_solve


def _operand_dtype(factors):
    return torch.float64 if factors.dtype == torch.float64 else torch.float32


def block_grams(factors: dict, blocks: list, batch_size: int, gram=None) -> torch.Tensor:
    """K (L, B, B): K_l = Σ_{p ∈ block l} U_pᵀ U_p over the parameters with factors (zero for a
    block without any). gram(p, factors) -> K_p replaces a parameter's exact Gram (SENG's
    sketch). float64 when any factor is, else float32."""
    Ks, dtype, device = [], torch.float32, None
    for _, params in blocks:
        K = None
        for p in params:
            f = factors.get(p)
            if f is None:
                continue
            Kp = f.gram() if gram is None else gram(p, f)
            dtype = torch.float64 if Kp.dtype == torch.float64 else dtype
            K = Kp if K is None else K + Kp.to(K.dtype)
            device = Kp.device
        Ks.append(K)
    if device is None:
        device = next(p.device for _, params in blocks for p in params)
    zero = torch.zeros(batch_size, batch_size, dtype=dtype, device=device)
    return torch.stack([zero if K is None else K.to(dtype) for K in Ks])


def block_projections(factors: dict, blocks: list, v: dict, batch_size: int, dtype, device):
    """(L, B): (U_lᵀ v)_i = Σ_{p ∈ block l} ⟨g_ip, v_p⟩ (NaN/Inf in v read as 0: they reach the
    direction through v itself)."""
    rows = []
    for _, params in blocks:
        r = None
        for p in params:
            f = factors.get(p)
            if f is None or p not in v:
                continue
            Vp = torch.nan_to_num(v[p], 0.0, 0.0, 0.0).to(_operand_dtype(f))
            term = f.project(Vp).to(dtype)
            r = term if r is None else r + term
        rows.append(torch.zeros(batch_size, dtype=dtype, device=device) if r is None else r)
    return torch.stack(rows)


def block_weighted_sums(factors: dict, blocks: list, C) -> dict:
    """{p: U_p c_l} for every parameter with factors, c_l = C[l] ((B,) or (B, m))."""
    out = {}
    for l, (_, params) in enumerate(blocks):
        for p in params:
            f = factors.get(p)
            if f is not None:
                out[p] = f.weighted_sum(C[l].to(_operand_dtype(f))).to(_operand_dtype(f))
    return out


def solve_blocks(K, damping, R, backend=None):
    """(X, ok, info, damping_used): X_l = (K_l + λ_l I)⁻¹ R_l for the stacked blocks (K (L, B, B),
    damping (L,), R (L, B, r)); ok_l: solved (info 0) and X_l finite — on the device."""
    X, info, used = woodbury_solve(K, damping.to(K.dtype), R.to(K.dtype), backend=backend)
    ok = (info == 0) & torch.isfinite(X).flatten(1).all(1)
    return X, ok, info, used


class NaturalDirections(NamedTuple):
    direction: dict  # {param: (F + λI)⁻¹ v restricted to param}
    coefficients: torch.Tensor  # (L, B): c = (K + λB·I)⁻¹ 1, or (K + λB·I)⁻¹ Uᵀ v
    ok: torch.Tensor  # (L,) bool: the block's solve succeeded and is finite
    info: torch.Tensor  # (L,) int32: woodbury_solve's info
    damping_used: torch.Tensor  # (L,): the λ·B the solve used (jitter ladder)


def natural_directions(factors: dict, blocks: list, K, damping, batch_size: int, v=None,
                       backend=None) -> NaturalDirections:
    """(F + λ_l I)⁻¹ v per block l (see the module docstring) from the blocks' Grams K (L, B, B)
    and dampings λ (L,): v None for the mean gradient (directions for the parameters with
    factors), else {param: tensor} (directions for every parameter of v in the blocks; a
    parameter without factors gets v_p / λ). A block whose solve fails gets c = 0."""
    B = batch_size
    lam = damping.to(device=K.device, dtype=K.dtype)
    if v is None:
        R = torch.ones(K.shape[0], B, 1, dtype=K.dtype, device=K.device)
    else:
        R = block_projections(factors, blocks, v, B, K.dtype, K.device)[:, :, None]
    X, ok, info, used = solve_blocks(K, lam * B, R, backend)
    C = X[:, :, 0]
    weighted = block_weighted_sums(factors, blocks, C)
    if v is None:
        return NaturalDirections(weighted, C, ok, info, used)
    direction = {}
    for l, (_, params) in enumerate(blocks):
        for p in params:
            if p in v:
                correction = weighted.get(p)
                vp = v[p].to(K.dtype)
                direction[p] = (vp if correction is None else vp - correction.to(K.dtype)) / lam[l]
    return NaturalDirections(direction, C, ok, info, used)


def _check_v(capture, v):
    if not isinstance(v, dict):
        raise TypeError(f"ng_solve: v must be None or a dict {{param: tensor}}, got "
                        f"{type(v).__name__}")
    for name, p in capture.parameters():
        if p not in v:
            raise ValueError(f"ng_solve: v has no tensor for parameter '{name}'")
        if not isinstance(v[p], torch.Tensor) or tuple(v[p].shape) != tuple(p.shape):
            raise ValueError(f"ng_solve: v['{name}'] must be a tensor of shape "
                             f"{tuple(p.shape)}, got {getattr(v[p], 'shape', type(v[p]))}")


class NGSolveResult(NamedTuple):
    direction: dict  # {param: (F + λI)⁻¹ v restricted to param}
    info: dict  # {block: 0-d int32 tensor}: woodbury_solve's info (0 = solved)
    damping_used: dict  # {block: 0-d tensor}: the λ·B actually used (jitter ladder)


def ng_solve(capture: Capture, damping: float, v: dict | None = None, *, by: str = "model",
             write_grad: bool = False, backend: str | None = None) -> NGSolveResult:
    """(F + λI)⁻¹ v for the batch captured by `capture` (see the module docstring).

    damping: λ > 0. v: None for the mean gradient ḡ (the natural-gradient direction), or a
      dict {param: tensor of param.shape} covering every captured parameter.
    by: "model" (F over all captured parameters), "module" or "parameter" (block-diagonal F:
      one block per module / per parameter, Capture.blocks(by), solved together in one
      batched Woodbury call).
    write_grad: also set param.grad to the direction (in the param's dtype).
    A block whose damped Gram cannot be factored even after woodbury_solve's jitter ladder
    gets a zero coefficient vector (direction 0 for ḡ, v/λ for a general v: no curvature
    correction) and its info ≠ 0 in the result — never NaN. Nothing here synchronizes with
    the device: info and damping_used stay tensors (read them when you need them).
    """
    if not isinstance(capture, Capture):
        raise TypeError(f"ng_solve: capture must be a lowrank_kernels.capture.Capture, got "
                        f"{type(capture).__name__}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or \
            not damping > 0 or damping == float("inf"):
        raise ValueError(f"ng_solve: damping must be a finite number > 0, got {damping!r}")
    if by not in ("model", "module", "parameter"):
        raise ValueError(f"ng_solve: by must be 'model', 'module' or 'parameter', got {by!r}")
    blocks = capture.blocks(by)
    if v is not None:
        _check_v(capture, v)
    factors, B = capture.factors(), capture.batch_size
    K = block_grams(factors, blocks, B)
    lam = torch.full((len(blocks),), float(damping), dtype=K.dtype, device=K.device)
    solved = natural_directions(factors, blocks, K, lam, B, v, backend)
    direction = {}
    for _, params in blocks:
        for p in params:
            d = solved.direction.get(p)
            direction[p] = torch.zeros(p.shape, dtype=K.dtype, device=K.device) if d is None \
                else d
            if write_grad:
                p.grad = direction[p].to(p.dtype)
    labels = ["model"] if by == "model" else [label for label, _ in blocks]
    return NGSolveResult(direction, {label: solved.info[l] for l, label in enumerate(labels)},
                         {label: solved.damping_used[l] for l, label in enumerate(labels)})
