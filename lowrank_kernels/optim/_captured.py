"""What the optimizers need from a Capture, per parameter and per layer.

The optimizers need a different coefficient vector per layer (block-diagonal natural
gradient), per-parameter Grams (to sketch the big ones) and factors kept across steps (SENG
reuses a refresh batch's U; KFAC reads the layer tokens a, e). All of it comes from the
public `Capture.factors()`: one immutable `Factors` per parameter, whose `gram` /
`weighted_sum` / `project` run the public ops. Here a parameter's per-sample gradients are a
list of Factors whose gradients add up (the capture gives one; [] when the parameter got
none). The ops never raise on non-finite data by default (strict mode aside): a NaN/Inf
result flows into the solve and the guarded update, which test it on the device.

Factors are stored as plain lists of dicts of tensors (`pack` / `unpack`, through
Factors.state_dict) so that an optimizer's state_dict saves with torch.save and loads with
torch.load(weights_only=True).
"""
import contextlib

import torch
from torch import nn

from ..capture import Capture, Factors


def start(model_or_params, capture, loss_reduction):
    """(params or groups, capture, model, recording): the capture is built from the model
    when the optimizer is built from one, and entered; its hooks stay on until
    `recording.close()` (an ExitStack that exits the capture, also when the caller had
    already entered it)."""
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
    recording = contextlib.ExitStack()
    try:
        recording.enter_context(capture)
    except RuntimeError:
        # already active: the caller runs forward and backward inside its own `with`
        recording.push(capture)
    return params, capture, model, recording


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
    """{id(param): [Factors]} of the last captured batch, and its batch size."""
    per_param = {id(p): [f] for p, f in capture.factors().items()}
    return per_param, capture.batch_size


def operand_dtype(factors_list):
    return (torch.float64 if any(f.dtype == torch.float64 for f in factors_list)
            else torch.float32)


def gram(factors_list):
    """K = UᵀU (B × B) of one parameter's per-sample gradients U = Σ U_a (None when it has
    none): K = Σ_a U_aᵀU_a + Σ_{a<b} (U_aᵀU_b + its transpose)."""
    if not factors_list:
        return None
    dtype = operand_dtype(factors_list)

    K = None
    for index, a in enumerate(factors_list):
        own = a.gram().to(dtype)
        K = own if K is None else K + own
        for b in factors_list[index + 1:]:
            cross = a.gram(b).to(dtype)
            K = K + cross + cross.T
    return K


def weighted_sum(factors_list, c, shape):
    """U c (param `shape` for c (B,), (m, *shape) for c (B, m)), summed over the list."""
    dtype = operand_dtype(factors_list)
    total = None
    for factors in factors_list:
        term = factors.weighted_sum(c.to(dtype)).to(dtype)
        total = term if total is None else total + term
    return total


def project(factors_list, V):
    """Uᵀ V (B,) for V of the parameter's shape, summed over the list."""
    dtype = operand_dtype(factors_list)
    total = None
    for factors in factors_list:
        term = factors.project(V.to(dtype)).to(dtype)
        total = term if total is None else total + term
    return total


def mean_grad(capture, p, B):
    """ḡ = (1/B) Σ_i g_i from p.grad, undoing the loss's reduction (see Capture)."""
    scale = {"mean": 1.0, "sum": float(B)}.get(capture.loss_reduction)
    if scale is None:
        scale = float(capture.loss_reduction) * B
    return p.grad if scale == 1.0 else p.grad / scale


def pack(factors_list):
    """Plain-tensor description of a parameter's factors (for state_dict): the entries of
    Factors.state_dict() of every element, in order ([] for none)."""
    return [entry for factors in factors_list for entry in factors.state_dict()]


def unpack(packed, backend=None):
    """The list of Factors that `pack` described ([] or one Factors holding every entry)."""
    return [Factors.from_state_dict(packed, backend=backend)] if packed else []
