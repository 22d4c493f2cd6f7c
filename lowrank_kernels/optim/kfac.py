"""KFAC baseline (Martens & Grosse 2015; convolutions: Grosse & Martens 2016), built on the
same captures as FNGD and SENG so that the comparison runs in our own benchmarks."""
import math
import warnings

import torch
from torch import nn

from ..capture._generic import is_conv1d
from ._base import GuardedOptimizer


class KFAC(GuardedOptimizer):
    """KFAC(model, lr, damping=1.0, *, momentum=0.9, weight_decay=0, factor_decay=0.95,
            inverse_every=10, kl_clip=None, loss_reduction="mean")
    KFAC(params, lr, ..., capture=Capture(model))

    For each nn.Linear, transformers Conv1D and nn.Conv2d (any groups: one Kronecker block per
    group, so a depthwise conv has one per channel) the Fisher block of [W, b] is
    approximated by A ⊗ G with, over the N = B·T tokens of a batch (T = 1, tokens, or conv
    positions),

        A = (1/N) Σ_{i,t} ā_it ā_itᵀ   (ā = [a, 1] with a bias; a = input / unfolded patch)
        G = (1/B) Σ_{i,t} e_it e_itᵀ   (e = ∂ℓ_i/∂output, per-sample loss gradient)

    (KFAC-expand for tokens). For nn.Embedding the input is one-hot, so A is diagonal (the
    token frequencies) and G = (1/B) Σ e eᵀ over the looked-up rows. A and G are running
    averages (factor_decay β: X ← βX + (1−β)X_batch, the first batch taken as is; a batch with
    non-finite factors is left out); every `inverse_every` steps the damped inverses are
    recomputed with factored Tikhonov damping (π = √((tr A/dim A) / (tr G/dim G))):
    A⁻¹ = (A + π√λ I)⁻¹, G⁻¹ = (G + √λ/π I)⁻¹ (Cholesky; a failed factorization keeps the
    previous inverses). Direction [dW, db] = G⁻¹ [∇W, ∇b] A⁻¹ with ∇ the mean gradient.
    KL clipping (Ba et al. 2017): the preconditioned directions are scaled by
    ν = min(1, √(kl_clip / (lr² Σ ⟨d, ∇⟩))), so a step never moves the model's output
    distribution by more than about kl_clip (None, the default: no clipping; 1e-3 is the
    usual value, and keeps a small damping stable on real models). The default damping 1.0
    is the one that trained every model of the transformers/timm/torchvision tests at B = 4
    (1e-3 diverged on Llama, BERT and GPT-NeoX).
    Other parameters — norms, directly used parameters, a weight tied to two layers, a conv
    called more than once — take the mean gradient: the constructor warns, naming them, and
    state["unpreconditioned"] counts them (parameters of the last step). Update and safety
    as in FNGD/SENG (θ ← θ − lr·buf, buf ← μ·buf + d + wd·θ; non-finite → ḡ or skip).
    """

    def __init__(self, model_or_params, lr, damping=1.0, *, momentum=0.9, weight_decay=0.0,
                 factor_decay=0.95, inverse_every=10, kl_clip=None, loss_reduction="mean",
                 capture=None, fallback=False, distributed="auto", process_group=None):
        if not lr > 0:
            raise ValueError(f"KFAC: lr must be > 0, got {lr}")
        if not damping > 0:
            raise ValueError(f"KFAC: damping must be > 0, got {damping}")
        if not 0 <= factor_decay < 1:
            raise ValueError(f"KFAC: factor_decay must be in [0, 1), got {factor_decay}")
        if not (isinstance(inverse_every, int) and inverse_every >= 1):
            raise ValueError(f"KFAC: inverse_every must be an int >= 1, got {inverse_every!r}")
        if kl_clip is not None and not kl_clip > 0:
            raise ValueError(f"KFAC: kl_clip must be > 0 or None, got {kl_clip!r}")
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        super().__init__(model_or_params, capture, defaults, loss_reduction=loss_reduction,
                         by_layer=True, fallback=fallback, distributed=distributed,
                         process_group=process_group)
        self.factor_decay, self.inverse_every, self.kl_clip = factor_decay, inverse_every, kl_clip
        self.state["kfac"] = {}
        others = _unpreconditioned(self.capture.model, self.blocks)
        self.state["unpreconditioned"] = len(others)
        if others:
            shown = ", ".join(f"{n} ({why})" for n, why in others[:6])
            warnings.warn(f"KFAC: {len(others)} parameter(s) are not preconditioned and take "
                          f"the mean gradient: {shown}{', …' if len(others) > 6 else ''}",
                          stacklevel=2)

    def _exact_directions(self, per_param, b):
        """Data parallel, exact: the batch factors' sums and the batch size are all-reduced
        (A and G of the global batch, identical on every rank); at an inverse step each layer's
        inverses are computed by one rank (layer l on rank l mod R) and broadcast."""
        return self._directions(per_param, b, reduce=True), b

    def _directions(self, per_param, B, reduce=False):
        step = self.state["step"]
        dp = self.data_parallel if reduce else None
        layers = []  # (name, weight, bias, kind, A_sum, G_sum, tokens per sample)
        for name, params in self.blocks:
            found = _split(params, per_param)
            if found is None:
                continue
            weight, bias, kind, tokens = found
            if kind == "embedding":
                idx, e, rows, padding_idx = tokens
                A_sum, G_sum = _embedding_factors(idx, e, rows, padding_idx)
                per_sample = idx.numel() // max(idx.shape[0], 1)
            else:
                a, e = _flat_tokens(tokens, bias is not None)  # (G, N, d_in[+1]), (G, N, d_out)
                A_sum, G_sum = a.transpose(1, 2) @ a, e.transpose(1, 2) @ e
                per_sample = a.shape[1] // max(B, 1)
            layers.append((name, weight, bias, kind, A_sum, G_sum, per_sample))
        if dp is not None:  # Σ over the ranks: one all-reduce per dtype, one for B
            B = int(dp.all_reduce_sum(torch.tensor([B], dtype=torch.int64)))
            sums = [t for layer in layers for t in layer[4:6]]
            for dtype in dict.fromkeys(t.dtype for t in sums):
                mine = [t for t in sums if t.dtype == dtype]
                for t, total in zip(mine, dp.sum(mine)):
                    t.copy_(total)
        inverting = step % self.inverse_every == 0
        states, owners = {}, {}
        for k, (name, weight, bias, kind, A_sum, G_sum, per_sample) in enumerate(layers):
            A_batch = A_sum / max(per_sample * B, 1)
            G_batch = G_sum / B
            layer = _load(self.state["kfac"].get(name), kind)
            beta = self.factor_decay
            finite = torch.isfinite(A_batch).all() & torch.isfinite(G_batch).all()
            if layer is None or layer["A"].shape != A_batch.shape:
                # a non-finite first batch starts from identity factors
                layer = {"A": torch.where(finite, A_batch, _eye_like(A_batch, kind)),
                         "G": torch.where(finite, G_batch, _eye_like(G_batch, "matrix"))}
            else:  # a non-finite batch is not averaged in
                layer = dict(layer,
                             A=torch.where(finite, beta * layer["A"] + (1 - beta) * A_batch,
                                           layer["A"]),
                             G=torch.where(finite, beta * layer["G"] + (1 - beta) * G_batch,
                                           layer["G"]))
            if inverting or "A_inv" not in layer:
                owners[name] = 0 if dp is None else k % dp.world
                if dp is None or owners[name] == dp.rank:
                    layer = _invert(layer, self.group_of(weight)["damping"], kind)
                else:  # computed by its owner, broadcast below
                    layer = dict(layer, A_inv=torch.empty_like(layer["A"]),
                                 G_inv=torch.empty_like(layer["G"]),
                                 ok=torch.zeros((), dtype=torch.bool, device=layer["A"].device))
            states[name] = layer
        if dp is not None:  # the inverses computed this step, from their owners, in layer order
            for name, owner in owners.items():
                layer = states[name]
                packed = torch.cat([layer["A_inv"].reshape(-1), layer["G_inv"].reshape(-1),
                                    layer["ok"].to(layer["A_inv"].dtype).reshape(1)])
                dp.broadcast(packed, owner)
                a, g = layer["A_inv"].numel(), layer["G_inv"].numel()
                states[name] = dict(layer, A_inv=packed[:a].reshape(layer["A_inv"].shape),
                                    G_inv=packed[a:a + g].reshape(layer["G_inv"].shape),
                                    ok=packed[a + g] > 0.5)
        out = {}
        preconditioned = set()
        for name, weight, bias, kind, *_ in layers:
            layer = states[name]
            self.state["kfac"][name] = _store(layer, kind)
            direction = self._precondition(layer, weight, bias, kind, B)
            ok = layer["ok"]
            if bias is not None:
                d_weight, d_bias = direction
                out[id(bias)] = (d_bias, ok)
                preconditioned.add(id(bias))
            else:
                d_weight = direction
            out[id(weight)] = (d_weight, ok)
            preconditioned.add(id(weight))
        self.state["unpreconditioned"] = sum(
            1 for group in self.param_groups for p in group["params"]
            if p.grad is not None and id(p) not in preconditioned)
        return self._clip(out, B)

    def _precondition(self, layer, weight, bias, kind, B):
        """G⁻¹ [∇W, ∇b] A⁻¹ per group, back in the parameters' shapes."""
        grad = self._mean_grad(weight, B)
        dtype = layer["G_inv"].dtype
        if kind == "embedding":  # W (rows × d): diagonal A⁻¹ on the rows
            return (layer["A_inv"][:, None] * grad.to(dtype)) @ layer["G_inv"][0]
        groups = layer["G_inv"].shape[0]
        if kind == "transposed":  # Conv1D: W (d_in × d_out)
            grad = grad.T
        grad = grad.reshape(groups, grad.shape[0] // groups, -1).to(dtype)  # (G, o, d_in)
        if bias is not None:
            g_bias = self._mean_grad(bias, B).reshape(groups, -1, 1)
            grad = torch.cat([grad, g_bias.to(dtype)], 2)
        direction = layer["G_inv"] @ grad @ layer["A_inv"]
        d_bias = None
        if bias is not None:
            d_bias = direction[:, :, -1].reshape(bias.shape)
            direction = direction[:, :, :-1]
        direction = direction.reshape(-1, direction.shape[-1])
        d_weight = (direction.T if kind == "transposed" else direction).reshape(weight.shape)
        return d_weight if bias is None else (d_weight, d_bias)

    def _clip(self, out, B):
        """KL clipping: every preconditioned direction times ν = min(1, √(κ / (lr² Σ⟨d, ∇⟩)))."""
        if self.kl_clip is None or not out:
            return out
        total = None
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in out:
                    d, ok = out[id(p)]
                    g = self._mean_grad(p, B).to(d.dtype)
                    term = torch.where(ok, (d * g).sum() * group["lr"] ** 2, 0)
                    total = term if total is None else total + term
        nu = torch.clamp(torch.sqrt(self.kl_clip / total.abs().clamp(min=1e-30)), max=1.0)
        nu = torch.where(torch.isfinite(nu), nu, 1.0)
        return {k: (d * nu.to(d.dtype), ok) for k, (d, ok) in out.items()}


def _load(layer, kind):
    """A layer's state with the group dim (a single-group layer is stored without it)."""
    if layer is None or kind == "embedding" or layer["A"].dim() == 3:
        return layer
    return {k: (v[None] if k in ("A", "G", "A_inv", "G_inv") else v) for k, v in layer.items()}


def _store(layer, kind):
    if kind == "embedding" or layer["A"].shape[0] != 1:
        return layer
    return {k: (v[0] if k in ("A", "G", "A_inv", "G_inv") else v) for k, v in layer.items()}


def _unpreconditioned(model, blocks):
    """[(parameter name, why)] of the parameters KFAC leaves on the mean gradient, by module."""
    owners = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for name, params in blocks:
        module = model if name == "model" else model.get_submodule(name)
        kind = _layer_kind(module)
        for p in params:
            if kind is None:
                why = type(module).__name__
            elif owners.get(id(p), 0) > 1:
                why = "tied to another layer"
            elif p.dim() == 1 and getattr(module, "bias", None) is p and kind != "embedding":
                continue
            elif p is getattr(module, "weight", None):
                continue
            else:
                why = type(module).__name__
            out.append((names.get(id(p), name), why))
    return out


def _layer_kind(module):
    if is_conv1d(module, dict(module.named_parameters(recurse=False))):
        return "transposed"
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return "matrix"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def _split(params, per_param):
    """(weight, bias, kind, tokens) of a block KFAC preconditions, or None. kind: "matrix"
    (Linear, Conv2d with any groups: Factors.grouped_tokens()), "transposed" (Conv1D) or
    "embedding" (Factors.embedding_tokens())."""
    weight = next((p for p in params if p.grad is not None and p.dim() in (2, 4)), None)
    if weight is None:
        return None
    f = per_param.get(weight)
    if f is None:
        return None
    embedding = f.embedding_tokens()
    if embedding is not None:
        return weight, None, "embedding", embedding
    tokens = f.grouped_tokens()
    if tokens is None:
        return None
    kind = "transposed" if f.transposed else "matrix"
    d_out = weight.shape[1] if kind == "transposed" else weight.shape[0]
    bias = next((p for p in params if p is not weight and p.dim() == 1
                 and p.shape[0] == d_out and p.grad is not None), None)
    return weight, bias, kind, tokens


def _flat_tokens(tokens, with_bias):
    """(ā (G, N, d_in[+1]), e (G, N, d_out)): the layer's input tokens (unfolded patches per
    group for a convolution) and output-gradient tokens over the batch, in fp32 (fp64 for
    fp64 models)."""
    inputs, output_grads = tokens  # (B, N, G, d)
    dtype = torch.float64 if output_grads.dtype == torch.float64 else torch.float32
    groups = inputs.shape[2]
    a = inputs.reshape(-1, groups, inputs.shape[-1]).transpose(0, 1).to(dtype)
    e = output_grads.reshape(-1, groups, output_grads.shape[-1]).transpose(0, 1).to(dtype)
    if with_bias:
        a = torch.cat([a, a.new_ones(groups, a.shape[1], 1)], 2)
    return a, e


def _embedding_factors(idx, e, rows, padding_idx):
    """(Σ counts (rows,), Σ e eᵀ (1, d, d)) over the looked-up tokens: A = counts / N,
    G = (1/B) Σ e eᵀ."""
    dtype = torch.float64 if e.dtype == torch.float64 else torch.float32
    idx = idx.reshape(-1)
    e = e.reshape(-1, e.shape[-1]).to(dtype)
    keep = torch.ones_like(idx, dtype=dtype) if padding_idx is None else (
        idx != padding_idx).to(dtype)
    counts = torch.zeros(rows, dtype=dtype, device=e.device).index_add_(0, idx, keep)
    G = (e * keep[:, None]).T @ e
    return counts, G[None]


def _eye_like(M, kind):
    if kind == "embedding":
        return torch.ones_like(M)
    return torch.eye(M.shape[-1], dtype=M.dtype, device=M.device).expand_as(M).clone()


def _invert(layer, damping, kind):
    A, G = layer["A"], layer["G"]
    a_mean = A.mean() if kind == "embedding" else torch.diagonal(A, dim1=-2, dim2=-1).mean(-1)
    g_mean = torch.diagonal(G, dim1=-2, dim2=-1).mean(-1)
    pi = torch.sqrt((a_mean / g_mean.clamp(min=1e-30)).clamp(min=1e-30))
    root = math.sqrt(damping)
    if kind == "embedding":
        shift = pi * root
        A_inv = 1.0 / (A + shift)
        ok_a = torch.isfinite(A_inv).all()
    else:
        A_inv, ok_a = _damped_inverse(A, (pi * root)[..., None, None])
    G_inv, ok_g = _damped_inverse(G, (root / pi).reshape(-1, 1, 1))
    ok = ok_a & ok_g
    if "A_inv" in layer:  # keep the previous inverses where this factorization failed
        A_inv = torch.where(ok, A_inv, layer["A_inv"])
        G_inv = torch.where(ok, G_inv, layer["G_inv"])
        ok = ok | layer["ok"]
    return dict(layer, A_inv=A_inv, G_inv=G_inv, ok=ok)


def _damped_inverse(M, shift):
    """((M + shift·I)⁻¹, ok) through batched Cholesky factorizations (M (G, d, d))."""
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
    L, info = torch.linalg.cholesky_ex(M + shift * eye)
    inverse = torch.cholesky_inverse(L)
    return inverse, (info == 0).all() & torch.isfinite(inverse).all()
