"""Low-rank compression of a trained model: each Linear weight W (out × in) — and each Conv2d
weight reshaped to out × (in·kh·kw) — is replaced by its rank-r truncated SVD
W ≈ U_r Σ_r V_rᵀ, computed by randomized SVD (lowrank_kernels.sketch), as two thin layers

    Linear:  x → (Σ_r^½ V_rᵀ) x → (U_r Σ_r^½) · + b         nn.Sequential(Linear(in, r), Linear(r, out))
    Conv2d:  the first conv has Σ_r^½ V_rᵀ reshaped to r × in × kh × kw (the layer's stride,
             padding, dilation), the second is a 1×1 conv with U_r Σ_r^½ and the bias

(Eckart–Young: ‖W − W_r‖_F² = Σ_{i>r} σ_i², the least of any rank-r matrix). The rank rule:
a fixed `rank`, the smallest r keeping a fraction `energy` of Σ σ_i², or the effective rank
⌈exp(H(p))⌉, p_i = σ_i / Σ_j σ_j (Roy & Vetterli 2007). A layer is replaced only when the
factors hold fewer parameters than W: r (in + out) < in · out. transformers' Conv1D (weight
stored in × out) is a Linear with W = weightᵀ. Every other layer with a weight matrix is
listed in the report with the reason it was left alone: a grouped or depthwise convolution
(no single W), a weight tied to another module (replacing it would untie them), a name in
`skip`, or factors that would not save parameters. The report's parameter counts are the
model's (shared parameters counted once).
"""
import dataclasses
import math

import torch

from ..capture._generic import is_conv1d
from ..sketch import randomized_svd


def effective_rank(S: torch.Tensor) -> float:
    """exp(−Σ p_i log p_i), p_i = σ_i / Σ_j σ_j (terms with p_i = 0 count 0)."""
    p = S.double() / S.double().sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def choose_rank(S, rank=None, energy=None, use_effective_rank=False) -> int:
    """The rank that the rule keeps for singular values S (descending, all of them)."""
    rules = (rank is not None) + (energy is not None) + bool(use_effective_rank)
    if rules != 1:
        raise ValueError("compress: give exactly one of rank=, energy= or effective_rank=True")
    if rank is not None:
        if rank < 1:
            raise ValueError(f"compress: rank must be ≥ 1, got {rank}")
        return min(int(rank), S.numel())
    if energy is not None:
        if not 0 < energy <= 1:
            raise ValueError(f"compress: energy must be in (0, 1], got {energy}")
        kept = torch.cumsum(S.double() ** 2, 0) / (S.double() ** 2).sum()
        return min(int((kept < energy - 1e-12).sum()) + 1, S.numel())
    return min(max(1, math.ceil(effective_rank(S) - 1e-9)), S.numel())


@dataclasses.dataclass
class LayerReport:
    name: str
    kind: str
    shape: tuple  # (out, in) or (out, in, kh, kw)
    rank: int | None  # None: kept whole (the factors would not save parameters)
    full_rank: int
    params_before: int
    params_after: int
    flops_before: float  # per sample, 2 × multiply-adds (0 when no example input was given)
    flops_after: float
    relative_error: float  # ‖W − U_r Σ_r V_rᵀ‖_F / ‖W‖_F of the factors actually used
    reason: str = ""  # why the layer was kept whole ("" when it was replaced)


@dataclasses.dataclass
class CompressionReport:
    layers: list
    params_before: int  # whole model
    params_after: int

    @property
    def flops_before(self):
        return sum(layer.flops_before for layer in self.layers)

    @property
    def flops_after(self):
        return sum(layer.flops_after for layer in self.layers)

    def to_markdown(self) -> str:
        lines = ["| layer | shape | rank / full | params before → after | FLOPs before → after "
                 "| rel. error ‖W−W_r‖/‖W‖ |", "|---|---|---|---|---|---|"]
        for lr in self.layers:
            rank = (f"{lr.rank} / {lr.full_rank}" if lr.rank is not None
                    else f"kept ({lr.reason}) / {lr.full_rank}")
            lines.append(f"| {lr.name} | {'×'.join(map(str, lr.shape))} | {rank} | "
                         f"{lr.params_before:,} → {lr.params_after:,} | "
                         f"{lr.flops_before:,.0f} → {lr.flops_after:,.0f} | "
                         f"{lr.relative_error:.3g} |")
        lines.append(f"| **model** | | | {self.params_before:,} → {self.params_after:,} "
                     f"({1 - self.params_after / self.params_before:.1%} saved) | "
                     f"{self.flops_before:,.0f} → {self.flops_after:,.0f}"
                     + (f" ({1 - self.flops_after / self.flops_before:.1%} saved)"
                        if self.flops_before else "") + " | |")
        return "\n".join(lines)


def _matrix(layer):
    W = layer.weight.detach()
    if _is_conv1d(layer):
        return W.T
    return W.reshape(W.shape[0], -1)


def _is_conv1d(module):
    return is_conv1d(module, dict(module.named_parameters(recurse=False)))


def _factor_modules(layer, U, S, V):
    """Two layers with weights Σ^½ Vᵀ and U Σ^½ (the bias on the second)."""
    r = S.numel()
    root = S.sqrt()
    first_w, second_w = root[:, None] * V.T, U * root[None, :]
    has_bias = layer.bias is not None
    like = dict(device=layer.weight.device, dtype=layer.weight.dtype)
    if isinstance(layer, torch.nn.Linear) or _is_conv1d(layer):
        out_dim, in_dim = U.shape[0], V.shape[0]
        first = torch.nn.Linear(in_dim, r, bias=False, **like)
        second = torch.nn.Linear(r, out_dim, bias=has_bias, **like)
        first.weight.data.copy_(first_w)
    else:
        first = torch.nn.Conv2d(layer.in_channels, r, layer.kernel_size, layer.stride,
                                layer.padding, layer.dilation, bias=False,
                                padding_mode=layer.padding_mode, **like)
        second = torch.nn.Conv2d(r, layer.out_channels, 1, bias=has_bias, **like)
        first.weight.data.copy_(first_w.reshape(first.weight.shape))
        second_w = second_w[:, :, None, None]
    second.weight.data.copy_(second_w)
    if has_bias:
        second.bias.data.copy_(layer.bias.detach())
    return torch.nn.Sequential(first, second)


def _positions(model, example_input, names):
    """Output positions per sample (tokens, or H_out·W_out) of each named layer."""
    if example_input is None:
        return {}
    batch = example_input.shape[0]
    found, hooks = {}, []
    modules = dict(model.named_modules())
    for name in names:
        def hook(module, inputs, output, name=name):
            linear = isinstance(module, torch.nn.Linear) or _is_conv1d(module)
            channels = output.shape[-1] if linear else output.shape[1]
            found[name] = output.numel() // (channels * batch)
        hooks.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
    return found


def _weight_layer(module):
    """A layer compress knows (Linear, Conv1D, Conv2d)."""
    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or _is_conv1d(module)


def _why_kept(name, module, skip, holders):
    """Why a Linear / Conv1D / Conv2d is not replaced, or "" when it may be."""
    if name in skip:
        return "in skip"
    if isinstance(module, torch.nn.Conv2d) and module.groups != 1:
        return f"grouped conv, groups={module.groups}"
    others = [n for n in holders.get(id(module.weight), []) if n != name]
    if others:
        return f"weight tied to {', '.join(others)}"
    return ""


def compress(model, *, rank=None, energy=None, effective_rank=False, example_input=None,
             skip=(), oversample=10, power_iters=4, seed=0):
    """Replace, in place, every Linear, transformers Conv1D and (groups = 1) Conv2d of `model`
    whose name is not in `skip` and whose weight is not tied to another module by two thin
    layers holding its rank-r truncated SVD (randomized), r from exactly one
    rule: rank=r, energy=e (smallest r with Σ_{i≤r} σ_i² ≥ e Σ σ_i²) or effective_rank=True
    (r = ⌈exp(H(σ/Σσ))⌉). The energy and effective-rank rules need every σ_i: they come from
    torch.linalg.svdvals of W, the factors from randomized_svd (k = r, `oversample`,
    `power_iters`). example_input (a batch) lets the report count FLOPs per sample.
    Returns (model, CompressionReport)."""
    choose_rank(torch.ones(1), rank, energy, effective_rank)  # one valid rule
    params_before = sum(p.numel() for p in model.parameters())
    holders = {}  # id(parameter) -> names of the modules holding it
    for n, m in model.named_modules():
        for p in m.parameters(recurse=False):
            holders.setdefault(id(p), []).append(n)
    layers_all = [(n, m) for n, m in model.named_modules() if n != "" and _weight_layer(m)]
    positions = _positions(model, example_input, [n for n, _ in layers_all])
    layers = []
    for name, layer in layers_all:
        W = _matrix(layer)
        out_dim, in_dim = W.shape
        full_rank = min(out_dim, in_dim)
        pos = positions.get(name, 0)
        bias = 0 if layer.bias is None else layer.bias.numel()
        before = dict(params=W.numel() + bias, flops=2.0 * W.numel() * pos)
        reason = _why_kept(name, layer, skip, holders)
        if reason:
            layers.append(LayerReport(name, type(layer).__name__, tuple(layer.weight.shape), None,
                                      full_rank, before["params"], before["params"],
                                      before["flops"], before["flops"], 0.0, reason))
            continue
        work = W.double() if W.dtype == torch.float64 else W.float()
        if rank is not None:
            r = min(int(rank), full_rank)
        else:
            r = choose_rank(torch.linalg.svdvals(work), energy=energy,
                            use_effective_rank=effective_rank)
        if r * (in_dim + out_dim) >= in_dim * out_dim:
            layers.append(LayerReport(name, type(layer).__name__, tuple(layer.weight.shape), None,
                                      full_rank, before["params"], before["params"],
                                      before["flops"], before["flops"], 0.0,
                                      "factors would not save parameters"))
            continue
        U, S, V = randomized_svd(work, r, oversample=oversample, power_iters=power_iters,
                                 seed=seed)
        error = float(torch.linalg.matrix_norm(work - (U * S) @ V.T) /
                      torch.linalg.matrix_norm(work))
        replacement = _factor_modules(layer, U.to(W.dtype), S.to(W.dtype), V.to(W.dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
        layers.append(LayerReport(name, type(layer).__name__, tuple(layer.weight.shape), r,
                                  full_rank, before["params"], r * (in_dim + out_dim) + bias,
                                  before["flops"], 2.0 * r * (in_dim + out_dim) * pos, error))
    params_after = sum(p.numel() for p in model.parameters())
    return model, CompressionReport(layers, params_before, params_after)
