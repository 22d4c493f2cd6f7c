"""Random-subspace training (Li et al., "Measuring the Intrinsic Dimension of Objective
Landscapes", ICLR 2018): only d coordinates train, θ = θ₀ + P d."""
import torch

from . import _args
from .checkpoints import flatten_parameters
from .projections import make_projection


class SubspaceModel(torch.nn.Module):
    """Wraps `model` so that its parameters are θ = θ₀ + P·coords: θ₀ the model's initial
    parameters (frozen), P a D×d random projection ('dense', 'sparse', 'fastfood' or
    'onthefly', see subspace.projections), coords (d, zero at the start) the only trainable
    parameter. forward runs the model with torch.func.functional_call on θ's views; the
    gradient of coords is Pᵀ ∇θ. Buffers (BatchNorm statistics) stay the model's own."""

    def __init__(self, model, d, projection="fastfood", seed=0, **projection_kwargs):
        super().__init__()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"SubspaceModel: model must be a torch.nn.Module, got "
                            f"{type(model).__name__}")
        _args.positive_int("SubspaceModel", "d", d)
        if not isinstance(projection, (str, torch.nn.Module)):
            raise TypeError(f"SubspaceModel: projection must be a name ('dense', 'sparse', "
                            f"'fastfood', 'onthefly') or a projection module, got "
                            f"{type(projection).__name__}")
        self.module = model
        named = list(model.named_parameters())
        if not named:
            raise ValueError("SubspaceModel: the model has no parameters")
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        for _, p in named:
            p.requires_grad_(False)
        theta0 = flatten_parameters(p for _, p in named)
        self.register_buffer("theta0", theta0)
        self.D = theta0.numel()
        if isinstance(projection, str):
            projection = make_projection(projection, self.D, d, seed, dtype=theta0.dtype,
                                         device=theta0.device, **projection_kwargs)
        self.projection = projection
        self.coords = torch.nn.Parameter(torch.zeros(d, dtype=theta0.dtype,
                                                     device=theta0.device))

    def parameters_from(self, theta):
        """{name: view of θ} for functional_call."""
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes):
            n = shape.numel()
            out[name] = theta[offset:offset + n].view(shape)
            offset += n
        return out

    def theta(self):
        """θ = θ₀ + P·coords (D), differentiable in coords."""
        return self.projection(self.coords, self.theta0)

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.module, self.parameters_from(self.theta()),
                                          args, kwargs)
