"""KFAC baseline (Martens & Grosse 2015; convolutions: Grosse & Martens 2016), built on the
same captures as FNGD and SENG so that the comparison runs in our own benchmarks."""
import math

import torch

from . import _captured
from ._base import GuardedOptimizer


class KFAC(GuardedOptimizer):
    """KFAC(model, lr, damping=1e-3, *, momentum=0.9, weight_decay=0, factor_decay=0.95,
            inverse_every=10, loss_reduction="mean")
    KFAC(params, lr, ..., capture=Capture(model))

    For each nn.Linear and nn.Conv2d (groups = 1) the Fisher block of [W, b] is approximated
    by A ⊗ G with, over the N = B·T tokens of a batch (T = 1, tokens, or conv positions),

        A = (1/N) Σ_{i,t} ā_it ā_itᵀ   (ā = [a, 1] with a bias; a = input / unfolded patch)
        G = (1/B) Σ_{i,t} e_it e_itᵀ   (e = ∂ℓ_i/∂output, per-sample loss gradient)

    (KFAC-expand for tokens). A and G are running averages (factor_decay β:
    X ← βX + (1−β)X_batch, the first batch taken as is; a batch with non-finite factors is
    left out); every `inverse_every` steps the damped inverses are recomputed with factored
    Tikhonov damping π = √((tr A/dim A) / (tr G/dim G)):
    A⁻¹ = (A + π√λ I)⁻¹, G⁻¹ = (G + √λ/π I)⁻¹ (Cholesky; a failed factorization keeps the
    previous inverses). Direction [dW, db] = G⁻¹ [∇W, ∇b] A⁻¹ with ∇ the mean gradient.
    Other parameters (norms, embeddings, grouped convolutions) take the mean gradient. Update
    and safety as in FNGD/SENG (θ ← θ − lr·buf, buf ← μ·buf + d + wd·θ; non-finite → ḡ or skip).
    """

    def __init__(self, model_or_params, lr, damping=1e-3, *, momentum=0.9, weight_decay=0.0,
                 factor_decay=0.95, inverse_every=10, loss_reduction="mean", capture=None):
        if not lr > 0:
            raise ValueError(f"KFAC: lr must be > 0, got {lr}")
        if not damping > 0:
            raise ValueError(f"KFAC: damping must be > 0, got {damping}")
        if not 0 <= factor_decay < 1:
            raise ValueError(f"KFAC: factor_decay must be in [0, 1), got {factor_decay}")
        if not (isinstance(inverse_every, int) and inverse_every >= 1):
            raise ValueError(f"KFAC: inverse_every must be an int >= 1, got {inverse_every!r}")
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        super().__init__(model_or_params, capture, defaults, loss_reduction=loss_reduction,
                         by_layer=True)
        self.factor_decay, self.inverse_every = factor_decay, inverse_every
        self.state["kfac"] = {}

    def _directions(self, per_param, B):
        step = self.state["step"]
        out = {}
        for name, params in self.blocks:
            weight, bias, tokens = _split(params, per_param)
            if weight is None:
                continue
            a, e = _flat_tokens(tokens, bias is not None)
            A_batch = a.T @ a / a.shape[0]
            G_batch = e.T @ e / B
            layer = self.state["kfac"].get(name)
            beta = self.factor_decay
            finite = torch.isfinite(A_batch).all() & torch.isfinite(G_batch).all()
            if layer is None:  # a non-finite first batch starts from identity factors
                layer = {"A": torch.where(finite, A_batch, _eye(A_batch)),
                         "G": torch.where(finite, G_batch, _eye(G_batch))}
            else:  # a non-finite batch is not averaged in
                layer = dict(layer,
                             A=torch.where(finite, beta * layer["A"] + (1 - beta) * A_batch,
                                           layer["A"]),
                             G=torch.where(finite, beta * layer["G"] + (1 - beta) * G_batch,
                                           layer["G"]))
            if step % self.inverse_every == 0 or "A_inv" not in layer:
                layer = _invert(layer, self.group_of(weight)["damping"])
            self.state["kfac"][name] = layer
            grad = _captured.mean_grad(self.capture, weight, B).reshape(weight.shape[0], -1)
            if bias is not None:
                grad = torch.cat([grad, _captured.mean_grad(self.capture, bias, B)[:, None]], 1)
            grad = grad.to(layer["A_inv"].dtype)
            direction = layer["G_inv"] @ grad @ layer["A_inv"]
            ok = layer["ok"]
            if bias is not None:
                out[id(bias)] = (direction[:, -1], ok)
                direction = direction[:, :-1]
            out[id(weight)] = (direction.reshape(weight.shape), ok)
        return out


def _split(params, per_param):
    """(weight, bias, LayerTokens) of a Linear / Conv2d (groups = 1) block whose weight's
    per-sample gradients are one token set (Factors.tokens()), or (None, None, None)."""
    weight = next((p for p in params if p.grad is not None and p.dim() in (2, 4)), None)
    if weight is None:
        return None, None, None
    factors = per_param.get(id(weight), [])
    tokens = factors[0].tokens() if len(factors) == 1 else None
    if tokens is None:
        return None, None, None
    bias = next((p for p in params if p is not weight and p.dim() == 1
                 and p.shape[0] == weight.shape[0] and p.grad is not None), None)
    return weight, bias, tokens


def _flat_tokens(tokens, with_bias):
    """(ā (N, d_in[+1]), e (N, d_out)): the layer's input tokens (unfolded patches for a
    convolution) and output-gradient tokens over the batch, in fp32 (fp64 for fp64 models)."""
    inputs, output_grads = tokens
    dtype = torch.float64 if output_grads.dtype == torch.float64 else torch.float32
    a = inputs.reshape(-1, inputs.shape[-1]).to(dtype)
    e = output_grads.reshape(-1, output_grads.shape[-1]).to(dtype)
    if with_bias:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
    return a, e


def _eye(M):
    return torch.eye(M.shape[0], dtype=M.dtype, device=M.device)


def _invert(layer, damping):
    A, G = layer["A"], layer["G"]
    pi = torch.sqrt((torch.diagonal(A).mean() / torch.diagonal(G).mean().clamp(min=1e-30))
                    .clamp(min=1e-30))
    root = math.sqrt(damping)
    A_inv, ok_a = _damped_inverse(A, pi * root)
    G_inv, ok_g = _damped_inverse(G, root / pi)
    ok = ok_a & ok_g
    if "A_inv" in layer:  # keep the previous inverses where this factorization failed
        A_inv = torch.where(ok, A_inv, layer["A_inv"])
        G_inv = torch.where(ok, G_inv, layer["G_inv"])
        ok = ok | layer["ok"]
    return dict(layer, A_inv=A_inv, G_inv=G_inv, ok=ok)


def _damped_inverse(M, shift):
    """((M + shift·I)⁻¹, ok) through a Cholesky factorization."""
    L, info = torch.linalg.cholesky_ex(M + shift * _eye(M))
    inverse = torch.cholesky_inverse(L)
    return inverse, (info == 0) & torch.isfinite(inverse).all()
