"""ng_solve: the damped natural-gradient solve in sample space for a captured batch.

With U = [g_1 … g_B] the per-sample gradients (D × B), F = U Uᵀ / B the empirical Fisher and
K = Uᵀ U the B × B Gram, the Woodbury identity gives, for λ > 0,

    (F + λI)⁻¹ ḡ = U (K + λB·I)⁻¹ 1                    (ḡ = U 1 / B, the mean gradient)
    (F + λI)⁻¹ v = (v − U (K + λB·I)⁻¹ Uᵀ v) / λ       (any v)

so the D × D solve becomes one projection Uᵀ v, a batched B × B Woodbury solve and one
weighted sum — per layer (block-diagonal F) or for the whole model.
"""
from typing import NamedTuple

import torch

from .capture import Capture
from .ops.woodbury_solve import woodbury_solve


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
      one block per module / per parameter, solved together in one batched Woodbury call).
    write_grad: also set param.grad to the direction (in the param's dtype).
    A block whose damped Gram cannot be factored even after woodbury_solve's jitter ladder
    gets a zero coefficient vector (direction 0 for ḡ, v/λ for a general v: no curvature
    correction) and its info ≠ 0 in the result — never NaN. Nothing here synchronizes with
    the device: info and damping_used stay tensors (read them when you need them).
    """
    if not isinstance(capture, Capture):
        raise TypeError(f"ng_solve: capture must be a lowrank_kernels.capture.Capture, got "
                        f"{type(capture).__name__}")
    if not isinstance(damping, (int, float)) or not damping > 0 or damping == float("inf"):
        raise ValueError(f"ng_solve: damping must be a finite number > 0, got {damping!r}")
    B = capture.batch_size
    grams = capture.gram(by=by)
    grams = {None: grams} if by == "model" else grams
    labels = list(grams)
    K = torch.stack([grams[label] for label in labels])  # (L, B, B)
    if v is None:
        rhs = torch.ones(len(labels), B, dtype=K.dtype, device=K.device)
    else:
        projected = capture.project(v, by=by)
        projected = {None: projected} if by == "model" else projected
        rhs = torch.stack([projected[label].to(K.dtype) for label in labels])
    solve = woodbury_solve(K, damping * B, rhs, backend=backend)  # (K + λB I)⁻¹ rhs
    coefficients = {label: solve.X[k] for k, label in enumerate(labels)}
    weighted = capture.weighted_sum(coefficients[None] if by == "model" else coefficients,
                                    by=by)
    direction = {}
    for _, p in capture.parameters():
        d = weighted[p] if v is None else (v[p].to(weighted[p].dtype) - weighted[p]) / damping
        direction[p] = d
        if write_grad:
            p.grad = d.to(p.dtype)
    name = (lambda label: "model") if by == "model" else (lambda label: label)
    info = {name(label): solve.info[k] for k, label in enumerate(labels)}
    used = {name(label): solve.damping_used[k] for k, label in enumerate(labels)}
    return NGSolveResult(direction, info, used)
