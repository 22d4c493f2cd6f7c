"""What the optimizers need from a Capture, per parameter and per layer.

The public Capture API gives whole-model or per-module Grams and one weighted sum U c for
all parameters. The optimizers need a different coefficient vector per layer (block-diagonal
natural gradient), per-parameter Grams (to sketch the big ones) and factors kept across steps
(SENG reuses a refresh batch's U; KFAC reads a, e). So this module reads the capture's
per-parameter contributions (its factored per-sample gradients, `Capture._contributions()`)
and calls their `gram` / `weighted_sum` / `project`, which run the public ops.

Factors are stored as plain dicts of tensors (`pack` / `unpack`) so that an optimizer's
state_dict saves with torch.save and loads with torch.load(weights_only=True).
"""
import torch
from torch import nn

from ..capture import Capture
from ..capture import _kinds
from ..capture._capture import _param_gram


def start(model_or_params, capture, loss_reduction):
    """(params or groups, capture, model or None): the capture is built from the model when
    the optimizer is built from one, and entered (its hooks stay on until `close`)."""
    if isinstance(model_or_params, nn.Module):
        if capture is not None:
            raise ValueError("optimizer: pass either a model or (params, capture=...), not both")
        model = model_or_params
        capture = Capture(model, loss_reduction=loss_reduction, keep=True)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        if not isinstance(capture, Capture):
            raise TypeError("optimizer: built from parameters, it needs capture=Capture(model) "
                            f"(got {type(capture).__name__}); or pass the model itself")
        model, params = capture.model, model_or_params
    try:
        capture.__enter__()
    except RuntimeError:
        pass  # already active: the caller runs forward and backward inside its own `with`
    return params, capture, model


def layer_blocks(model, params, by_layer=True):
    """[(name, [params])]: the optimizer's parameters grouped by the module that owns them
    directly (the first one in model order, as the capture counts shared parameters); with
    by_layer=False one block "model" holding them all."""
    wanted = {id(p): p for p in params}
    if not by_layer:
        return [("model", [p for p in model.parameters() if id(p) in wanted])]
    seen, blocks = set(), []
    for name, module in model.named_modules():
        own = []
        for p in module.parameters(recurse=False):
            if id(p) in wanted and id(p) not in seen:
                seen.add(id(p))
                own.append(p)
        if own:
            blocks.append((name or "model", own))
    return blocks


def contributions(capture):
    """{id(param): [contribution, ...]} of the last captured batch, and its batch size."""
    per_param = capture._contributions()
    return per_param, capture.batch_size


def operand_dtype(contribution_list):
    return (torch.float64 if any(_dtype(c) == torch.float64 for c in contribution_list)
            else torch.float32)


def _dtype(c):
    return c.G.dtype if isinstance(c, _kinds.Dense) else c.E.dtype


def gram(contribution_list):
    """K = UᵀU (B × B) of one parameter's per-sample gradients (None when it has none)."""
    if not contribution_list:
        return None
    dtype = operand_dtype(contribution_list)
    B = contribution_list[0].batch_size
    return _finite_or_nan(lambda: _param_gram(contribution_list, None, False).to(dtype),
                          (B, B), dtype, _device(contribution_list[0]))


def _finite_or_nan(compute, shape, dtype, device):
    """compute(), or a NaN tensor of `shape` where an op refused non-finite data (the ops
    raise ValueError on NaN/Inf unless LOWRANK_CHECK_FINITE=0): the optimizers then see a
    non-finite result, whichever way the ops are configured, and fall back."""
    try:
        return compute()
    except ValueError as error:
        if "finite" not in str(error):
            raise
        return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _device(c):
    return c.G.device if isinstance(c, _kinds.Dense) else c.E.device


def weighted_sum(contribution_list, c, shape):
    """U c (param `shape` for c (B,), (m, *shape) for c (B, m)), summed over the calls."""
    dtype = operand_dtype(contribution_list)

    def compute():
        total = None
        for contribution in contribution_list:
            term = contribution.weighted_sum(c.to(dtype)).to(dtype)
            total = term if total is None else total + term
        return total

    return _finite_or_nan(compute, (*c.shape[1:], *shape), dtype, c.device)


def project(contribution_list, V):
    """Uᵀ V (B,) for V of the parameter's shape, summed over the calls."""
    dtype = operand_dtype(contribution_list)

    def compute():
        total = None
        for contribution in contribution_list:
            term = contribution.project(V.to(dtype)[None]).to(dtype).reshape(-1)
            total = term if total is None else total + term
        return total

    return _finite_or_nan(compute, (contribution_list[0].batch_size,), dtype, V.device)


def mean_grad(capture, p, B):
    """ḡ = (1/B) Σ_i g_i from p.grad, undoing the loss's reduction (see Capture)."""
    scale = {"mean": 1.0, "sum": float(B)}.get(capture.loss_reduction)
    if scale is None:
        scale = float(capture.loss_reduction) * B
    return p.grad if scale == 1.0 else p.grad / scale


def pack(contribution_list):
    """Plain-tensor description of contributions (for state_dict)."""
    out = []
    for c in contribution_list:
        if isinstance(c, _kinds.Linear):
            out.append({"kind": "linear", "A": c.A, "E": c.E})
        elif isinstance(c, _kinds.Conv2d):
            kernel_size, stride, padding, dilation, groups = c.geometry
            out.append({"kind": "conv2d", "X": c.X, "E": c.E, "kernel_size": list(kernel_size),
                        "stride": list(stride), "padding": list(padding),
                        "dilation": list(dilation), "groups": groups})
        elif isinstance(c, _kinds.Embedding):
            out.append({"kind": "embedding", "idx": c.idx, "E": c.E,
                        "num_embeddings": c.num_embeddings, "padding_idx": c.padding_idx})
        else:
            out.append({"kind": "dense", "G": c.G})
    return out


def unpack(packed, backend=None):
    out = []
    for d in packed:
        kind = d["kind"]
        if kind == "linear":
            out.append(_kinds.Linear(d["A"], d["E"], backend))
        elif kind == "conv2d":
            geometry = (tuple(d["kernel_size"]), tuple(d["stride"]), tuple(d["padding"]),
                        tuple(d["dilation"]), d["groups"])
            out.append(_kinds.Conv2d(d["X"], d["E"], geometry, backend))
        elif kind == "embedding":
            out.append(_kinds.Embedding(d["idx"], d["E"], d["num_embeddings"], d["padding_idx"],
                                        backend))
        else:
            out.append(_kinds.Dense(d["G"]))
    return out
