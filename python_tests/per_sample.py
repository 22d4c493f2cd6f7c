"""Per-sample gradients of real nn.Linear (over tokens) and nn.Conv2d layers from
torch.func.vmap(grad), in float64: the independent oracle of the Gram, weighted-sum and
projection ops of those layers. Each case returns the layer input x, the output gradient E
(of Σ_i loss_i) and U (B × D: per-sample gradients of [weight, bias], flattened)."""
import torch


def _per_sample(layer, x, seed):
    g = torch.Generator().manual_seed(seed + 1)
    target = torch.randn(layer(x).shape, generator=g, dtype=torch.float64).to(x.device)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def sample_loss(p, xi, ti):
        y = torch.func.functional_call(layer, p, (xi[None],))
        return torch.sum(torch.tanh(y[0]) * ti)

    grads = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(params, x, target)
    U = torch.cat([grads[k].flatten(1) for k in params], dim=1)
    y = layer(x)
    E, = torch.autograd.grad(torch.sum(torch.tanh(y) * target), y)
    return x, E.detach(), U


def linear_case(B, T, d_in, d_out, bias, device="cpu", seed=0):
    """nn.Linear on (B, T, d_in) tokens (T = None: plain (B, d_in) rows)."""
    torch.manual_seed(seed)
    layer = torch.nn.Linear(d_in, d_out, bias=bias, dtype=torch.float64, device=device)
    shape = (B, d_in) if T is None else (B, T, d_in)
    x = torch.randn(shape, dtype=torch.float64, device=device)
    return _per_sample(layer, x, seed)


def conv_case(B, C_in, C_out, hw, kernel_size, stride=1, padding=0, dilation=1, groups=1,
              bias=False, device="cpu", seed=0):
    """nn.Conv2d on (B, C_in, *hw) inputs."""
    torch.manual_seed(seed)
    layer = torch.nn.Conv2d(C_in, C_out, kernel_size, stride, padding, dilation, groups,
                            bias=bias, dtype=torch.float64, device=device)
    x = torch.randn((B, C_in, *hw), dtype=torch.float64, device=device)
    return _per_sample(layer, x, seed)


def split(U, weight_numel):
    """U (B × D) -> (weight part (B × weight_numel), bias part (B × rest))."""
    return U[:, :weight_numel], U[:, weight_numel:]
