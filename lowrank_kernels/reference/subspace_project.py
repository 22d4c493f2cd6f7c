"""Projections onto and out of a subspace with a stored basis P (D×k)."""
import torch


def _accumulation_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def subspace_project(P: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """c = Pᵀ g: P (D×k), g (D) → c (k), float32 (float64 when an input is float64)."""
    dtype = _accumulation_dtype(P, g)
    return P.to(dtype).T @ g.to(dtype)


def subspace_expand(P: torch.Tensor, alpha: torch.Tensor, base: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """w = base + P α: P (D×k), α (k), base (D) or None → w (D) in base's dtype (P's without
    base), accumulated in float32 (float64 when an input is float64)."""
    tensors = (P, alpha) if base is None else (P, alpha, base)
    dtype = _accumulation_dtype(*tensors)
    w = P.to(dtype) @ alpha.to(dtype)
    if base is not None:
        w += base.to(dtype)
    return w.to(P.dtype if base is None else base.dtype)
