"""What the optimizers need from a Capture: building one from the model, the parameter blocks
(Capture.blocks: one rule for the capture, ng_solve and the optimizers), the mean gradient,
and factors kept across steps. The per-sample-gradient algebra itself is
lowrank_kernels.natural_gradient (one path for ng_solve, FNGD and SENG).

Kept factors are stored as plain lists of dicts of tensors (`pack` / `unpack`, through
Factors.state_dict) so that an optimizer's state_dict saves with torch.save and loads with
torch.load(weights_only=True).
"""
import contextlib

from torch import nn

from ..capture import Capture, Factors


def start(model_or_params, capture, loss_reduction, fallback=False):
    """(params or groups, capture, model, recording): the capture is built from the model
    when the optimizer is built from one, and entered; its hooks stay on until
    `recording.close()` (an ExitStack that exits the capture, also when the caller had
    already entered it)."""
    if isinstance(model_or_params, nn.Module):
        if capture is not None:
            raise ValueError("optimizer: pass either a model or (params, capture=...), not both")
        if fallback not in (False, True):
            raise TypeError(f"optimizer: fallback must be a bool, got {fallback!r}")
        model = model_or_params
        capture = Capture(model, loss_reduction=loss_reduction, keep=True, fallback=fallback)
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


def layer_blocks(capture, params, by_layer=True):
    """[(name, [params])]: the optimizer's parameters in the capture's module blocks
    (Capture.blocks("module"); the model itself is named "model"), or with by_layer=False
    one block "model" holding them all."""
    wanted = {id(p) for p in params}
    blocks = []
    for label, block in capture.blocks("module" if by_layer else "model"):
        own = [p for p in block if id(p) in wanted]
        if own:
            blocks.append((label or "model", own))
    return blocks


def contributions(capture):
    """{param: Factors} of the last captured batch, and its batch size."""
    return capture.factors(), capture.batch_size


def mean_grad(capture, p, B):
    """ḡ = (1/B) Σ_i g_i from p.grad, undoing the loss's reduction (see Capture)."""
    scale = {"mean": 1.0, "sum": float(B)}.get(capture.loss_reduction)
    if scale is None:
        scale = float(capture.loss_reduction) * B
    return p.grad if scale == 1.0 else p.grad / scale


def pack(factors):
    """Plain-tensor description of a parameter's factors (for state_dict; [] for None)."""
    return [] if factors is None else list(factors.state_dict())


def unpack(packed, backend=None):
    """The Factors that `pack` described (None for [])."""
    return Factors.from_state_dict(packed, backend=backend) if packed else None
