"""Factors: the per-sample gradients of one parameter over a captured batch, in factored form.

`Capture.factors()` gives one `Factors` per captured parameter θ (D = θ.numel() entries):

    U = [g_1 … g_B] (D × B),   g_i = ∇_θ ℓ_i = Σ_calls g_i^(call)

kept as what the layer calls left (inputs and output gradients), never as U itself unless
the parameter is small. What it computes, through the lowrank_kernels ops:

    gram()                 K = UᵀU (B × B),  K_ij = ⟨g_i, g_j⟩;  diagonal=True: (‖g_i‖²)
    gram(other)            the cross-Gram Uᵀ U' (B × B') with the factors of another batch
    weighted_sum(c)        U c = Σ_i c_i g_i: c (B,) -> θ.shape, c (B, m) -> (m, *θ.shape)
    project(V)             Uᵀ v = (⟨g_i, v⟩)_i: V θ.shape -> (B,), V (m, *θ.shape) -> (B, m)
    tokens()               (a, e) with g_i = Σ_t e_it a_itᵀ for the weight of nn.Linear
                           calls or of one nn.Conv2d (groups = 1) call (e.g. for KFAC)
    sketch(s, seed)        the factors of g̃_i = S_out g_i S_inᵀ (E[K̃] = K)
    state_dict() / Factors.from_state_dict(...)   plain tensors, for torch.save

A Factors object is immutable and independent of its Capture: it holds references to the
captured tensors (detached), so it stays valid after `Capture.release()` and across later
batches (e.g. to keep a batch's curvature for later steps). Results are float64 when any
captured factor is float64, else float32 (`dtype`).
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..ops.sketch_matmul import sketch_matmul
from ..sketch import kronecker_sketch
from ..sketch.per_sample import output_side_seed
from ._kinds import Conv2dFactors, DenseFactors, EmbeddingFactors, LinearFactors, sum_gram

_KINDS = (LinearFactors, Conv2dFactors, EmbeddingFactors, DenseFactors)


class LayerTokens(NamedTuple):
    """The two factors of a layer weight's per-sample gradients, g_i = Σ_t e_it a_itᵀ
    (reshaped to the weight's shape), over N tokens per sample.

    inputs        a (B, N, d_in): the layer inputs; for a convolution the unfolded patches
                  (F.unfold order: d_in = C_in·kh·kw, N = H_out·W_out)
    output_grads  e (B, N, d_out): ∂ℓ_i/∂output at each token (per-sample loss gradients,
                  the loss's reduction undone)
    """
    inputs: torch.Tensor
    output_grads: torch.Tensor


def _dtype_of(part):
    return part.G.dtype if isinstance(part, DenseFactors) else part.E.dtype


def _shape_of(part):
    if isinstance(part, LinearFactors):
        shape = (part.E.shape[-1], part.A.shape[-1])
        return shape[::-1] if part.transposed else shape
    if isinstance(part, Conv2dFactors):
        return (part.E.shape[1], part.X.shape[1] // part.geometry[4], *part.geometry[0])
    if isinstance(part, EmbeddingFactors):
        return (part.num_embeddings, part.E.shape[-1])
    return tuple(part.G.shape[1:])


class Factors:
    """The per-sample gradients g_1 … g_B of one parameter (U = [g_i]), in factored form.

    Made by `Capture.factors()` (one per captured parameter) and `Factors.from_state_dict`;
    see the module docstring. Immutable; valid after the capture is released.
    """

    __slots__ = ("_parts",)

    def __init__(self, parts):
        parts = tuple(parts)
        if not parts or not all(isinstance(p, _KINDS) for p in parts):
            raise TypeError("Factors: made by Capture.factors() or Factors.from_state_dict(), "
                            "not directly")
        object.__setattr__(self, "_parts", parts)

    def __setattr__(self, name, value):
        raise AttributeError("Factors is immutable")

    def __reduce__(self):
        return (Factors, (self._parts,))

    def __repr__(self):
        kinds = "+".join(type(p).__name__.lower() for p in self._parts)
        return (f"Factors(batch_size={self.batch_size}, shape={self.shape}, dtype={self.dtype}, "
                f"parts={kinds})")

    # ---- description ---------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """B, the number of samples."""
        return self._parts[0].batch_size

    @property
    def shape(self) -> tuple:
        """The parameter's shape (the shape of each g_i)."""
        return tuple(_shape_of(self._parts[0]))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the results: float64 when any factor is float64, else float32."""
        return (torch.float64 if any(_dtype_of(p) == torch.float64 for p in self._parts)
                else torch.float32)

    @property
    def transposed(self) -> bool:
        """True for a weight stored (d_in × d_out) (transformers' Conv1D, y = x W + b): its
        tokens() give g_iᵀ = Σ_t e_it a_itᵀ, the transpose of the weight's per-sample gradient."""
        return any(isinstance(p, LinearFactors) and p.transposed for p in self._parts)

    @property
    def device(self) -> torch.device:
        part = self._parts[0]
        return (part.G if isinstance(part, DenseFactors) else part.E).device

    # ---- Gram, weighted sums, projections ------------------------------------------------
    def gram(self, other=None, *, diagonal=False) -> torch.Tensor:
        """K = Uᵀ U' (B × B'), K_ij = ⟨g_i, g'_j⟩, with U' = U (other=None) or the per-sample
        gradients of `other`, the Factors of the same parameter from another batch (or another
        term of the same one). diagonal=True: the vector (⟨g_i, g'_i⟩)_i (needs B' = B).
        A parameter used by several calls gets its calls' cross terms: K = Σ_{a,b} U_aᵀ U'_b."""
        if other is not None:
            if not isinstance(other, Factors):
                raise TypeError(f"Factors.gram: other must be Factors, got "
                                f"{type(other).__name__}")
            if other.shape != self.shape:
                raise ValueError(f"Factors.gram: other has parameter shape {other.shape}, "
                                 f"expected {self.shape}")
            if diagonal and other.batch_size != self.batch_size:
                raise ValueError(f"Factors.gram: diagonal=True needs other's batch size "
                                 f"{other.batch_size} to equal {self.batch_size}")
        dtype = self.dtype if other is None else torch.promote_types(self.dtype, other.dtype)
        K = sum_gram(self._parts, None if other is None else other._parts, diagonal)
        return K.to(dtype)

    def weighted_sum(self, c) -> torch.Tensor:
        """U c = Σ_i c_i g_i: c (B,) gives a tensor of the parameter's shape, c (B, m) gives
        (m, *shape) (one weighted sum per column)."""
        B = self.batch_size
        if not isinstance(c, torch.Tensor) or not c.is_floating_point():
            raise TypeError(f"Factors.weighted_sum: c must be a floating tensor of shape ({B},) "
                            f"or ({B}, m), got "
                            f"{c.dtype if isinstance(c, torch.Tensor) else type(c).__name__}")
        if c.dim() not in (1, 2) or c.shape[0] != B:
            raise ValueError(f"Factors.weighted_sum: c must have shape ({B},) or ({B}, m), got "
                             f"{tuple(c.shape)}")
        dtype = self.dtype
        total = None
        for part in self._parts:
            term = part.weighted_sum(c.to(dtype)).to(dtype)
            total = term if total is None else total + term
        return total

    def project(self, V) -> torch.Tensor:
        """Uᵀ v = (⟨g_i, v⟩)_i: V of the parameter's shape gives (B,); V (m, *shape), m
        directions, gives (B, m)."""
        shape = self.shape
        if not isinstance(V, torch.Tensor) or not V.is_floating_point():
            raise TypeError(f"Factors.project: V must be a floating tensor of shape {shape} or "
                            f"(m, *{shape}), got "
                            f"{V.dtype if isinstance(V, torch.Tensor) else type(V).__name__}")
        single = tuple(V.shape) == shape
        if not single and not (V.dim() == len(shape) + 1 and tuple(V.shape[1:]) == shape):
            raise ValueError(f"Factors.project: V must have shape {shape} or (m, *{shape}), "
                             f"got {tuple(V.shape)}")
        dtype, B = self.dtype, self.batch_size
        stacked = V.to(dtype)[None] if single else V.to(dtype)
        total = None
        for part in self._parts:
            term = part.project(stacked).to(dtype).reshape(B, -1)
            total = term if total is None else total + term
        return total[:, 0] if single else total

    # ---- the layer's own factors ---------------------------------------------------------
    def tokens(self):
        """LayerTokens(inputs a (B, N, d_in), output_grads e (B, N, d_out)) with
        g_i = reshape(Σ_t e_it a_itᵀ) — for the weight of nn.Linear calls (all calls' tokens:
        N = Σ_calls T) or of one nn.Conv2d call with groups = 1 (a = unfolded patches of the
        padded input); None for any other parameter (biases, norms, embeddings, grouped or
        repeatedly called convolutions, tied weights). For a transposed weight (`transposed`,
        transformers' Conv1D) Σ_t e_it a_itᵀ is g_iᵀ. The tensors are the captured ones (or
        their unfold): read them, do not modify them in place."""
        if len(self._parts) != 1:
            return None
        (part,) = self._parts
        if isinstance(part, LinearFactors):
            return LayerTokens(part.A, part.E)
        if isinstance(part, Conv2dFactors) and part.geometry[4] == 1:
            kernel_size, stride, padding, dilation, _ = part.geometry
            patches = F.unfold(part.X, kernel_size, dilation, padding, stride)  # (B, C·k, L)
            return LayerTokens(patches.transpose(1, 2), part.E.flatten(2).transpose(1, 2))
        return None

    def grouped_tokens(self):
        """LayerTokens(inputs a (B, N, G, d_in/G), output_grads e (B, N, G, d_out/G)) for the
        weight of one nn.Conv2d call with G groups (depthwise: G = C_in): group k's block of
        g_i is Σ_t e_itk a_itkᵀ (a = the group's unfolded patches); tokens() with G = 1 for
        everything tokens() covers; None otherwise."""
        if len(self._parts) == 1 and isinstance(self._parts[0], Conv2dFactors):
            part = self._parts[0]
            kernel_size, stride, padding, dilation, groups = part.geometry
            patches = F.unfold(part.X, kernel_size, dilation, padding, stride)  # (B, C·k, L)
            B, L = patches.shape[0], patches.shape[2]
            a = patches.reshape(B, groups, -1, L).permute(0, 3, 1, 2)
            e = part.E.reshape(B, groups, -1, L).permute(0, 3, 1, 2)
            return LayerTokens(a, e)
        tokens = self.tokens()
        if tokens is None:
            return None
        return LayerTokens(tokens.inputs[:, :, None], tokens.output_grads[:, :, None])

    def embedding_tokens(self):
        """(idx (B, N) int64, e (B, N, d), num_embeddings, padding_idx) for the weight of
        nn.Embedding calls (g_i = Σ_t onehot(idx_it) e_itᵀ, rows at padding_idx excluded);
        None for any other parameter (a weight tied to a linear layer included)."""
        if len(self._parts) != 1 or not isinstance(self._parts[0], EmbeddingFactors):
            return None
        part = self._parts[0]
        return part.idx, part.E, part.num_embeddings, part.padding_idx

    def sketch(self, size: int, seed: int, *, dist: str = "rademacher"):
        """The Factors of the Kronecker-sketched per-sample gradients

            g̃_i = S_out g_i S_inᵀ,   S (s × side) with E[SᵀS] = I,   E[⟨g̃_i, g̃_j⟩] = ⟨g_i, g_j⟩

        for the weight of nn.Linear or nn.Conv2d (groups = 1; channels mixed, S_in ⊗ I_kh·kw)
        calls: the same op on thinner factors, s = min(size, side) per side
        (sketch.kronecker_sketch: S_in from `seed`, S_out from output_side_seed(seed); Ω is
        generated from (seed, row, column), never stored). Every call of the parameter uses
        the same S_in, S_out, so g̃_i is the sketch of the sum. Other parameters (embeddings,
        materialized small ones, grouped convolutions) have no two-sided factors and come back
        unchanged (exact). Non-finite factors give a non-finite sketch (strict mode:
        lowrank_kernels.NonFiniteError)."""
        if not (isinstance(size, int) and size >= 1):
            raise ValueError(f"Factors.sketch: size must be an int >= 1, got {size!r}")
        if not all(isinstance(p, LinearFactors) or (isinstance(p, Conv2dFactors) and p.geometry[4] == 1)
                   for p in self._parts):
            return self
        return Factors(_sketch_part(p, size, seed, dist) for p in self._parts)

    # ---- persistence ---------------------------------------------------------------------
    def state_dict(self) -> list:
        """A list of plain dicts (tensors, ints, strings, lists; one per call group) that
        torch.save writes and torch.load(weights_only=True) reads back."""
        out = []
        for c in self._parts:
            if isinstance(c, LinearFactors):
                out.append({"kind": "linear", "A": c.A, "E": c.E, "transposed": c.transposed})
            elif isinstance(c, Conv2dFactors):
                kernel_size, stride, padding, dilation, groups = c.geometry
                out.append({"kind": "conv2d", "X": c.X, "E": c.E,
                            "kernel_size": list(kernel_size), "stride": list(stride),
                            "padding": list(padding), "dilation": list(dilation),
                            "groups": groups})
            elif isinstance(c, EmbeddingFactors):
                out.append({"kind": "embedding", "idx": c.idx, "E": c.E,
                            "num_embeddings": c.num_embeddings, "padding_idx": c.padding_idx})
            else:
                out.append({"kind": "dense", "G": c.G})
        return out

    @classmethod
    def from_state_dict(cls, state, *, backend=None):
        """The Factors saved by `state_dict()`; backend: passed to the ops (None: 'auto')."""
        if not isinstance(state, (list, tuple)) or not state:
            raise ValueError("Factors.from_state_dict: state must be the non-empty list that "
                             "Factors.state_dict() returns")
        parts = []
        for d in state:
            kind = d.get("kind") if isinstance(d, dict) else None
            if kind == "linear":
                parts.append(LinearFactors(d["A"], d["E"], backend, bool(d.get("transposed", False))))
            elif kind == "conv2d":
                geometry = (tuple(d["kernel_size"]), tuple(d["stride"]), tuple(d["padding"]),
                            tuple(d["dilation"]), d["groups"])
                parts.append(Conv2dFactors(d["X"], d["E"], geometry, backend))
            elif kind == "embedding":
                parts.append(EmbeddingFactors(d["idx"], d["E"], d["num_embeddings"], d["padding_idx"],
                                       backend))
            elif kind == "dense":
                parts.append(DenseFactors(d["G"]))
            else:
                raise ValueError(f"Factors.from_state_dict: unknown entry kind {kind!r} "
                                 "(expected 'linear', 'conv2d', 'embedding' or 'dense')")
        return cls(parts)


def _sketch_part(part, size, seed, dist):
    """One Linear or Conv2d (groups = 1) call's factors, sketched on both sides."""
    if isinstance(part, LinearFactors):
        A, E = part.A, part.E
        A2, E2 = kronecker_sketch(A.to(E.dtype), E, min(size, A.shape[-1]),
                                  min(size, E.shape[-1]), seed=seed, dist=dist)
        return LinearFactors(A2.to(E.dtype), E2.to(E.dtype), part.backend, part.transposed)
    X, E = part.X, part.E

    def channels(Y, s):  # (B, C, H, W) -> (B, min(size, C), H, W): Y's channels times Sᵀ
        flat = Y.permute(0, 2, 3, 1).reshape(-1, Y.shape[1])
        k = min(size, flat.shape[1])
        mixed = sketch_matmul(flat, k, s, dist) / math.sqrt(k)
        return mixed.reshape(Y.shape[0], Y.shape[2], Y.shape[3], -1).permute(0, 3, 1, 2)

    return Conv2dFactors(channels(X, seed).to(E.dtype), channels(E, output_side_seed(seed)).to(E.dtype),
                  part.geometry, part.backend)
