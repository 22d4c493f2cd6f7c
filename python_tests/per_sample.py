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


# ---- Conv2d cases shared by the conv2d tests: strided, padded, dilated, grouped, depthwise ----
# (B, C_in, C_out, (H, W), kernel_size, stride, padding, dilation, groups, bias)
CONV_CASES = [
    (1, 2, 3, (4, 4), (3, 3), (1, 1), (1, 1), (1, 1), 1, True),
    (3, 4, 6, (7, 6), (3, 2), (2, 1), (1, 0), (1, 2), 2, True),
    (2, 3, 5, (5, 4), (2, 2), (1, 2), (0, 1), (1, 1), 1, False),
    (3, 4, 4, (3, 4), (3, 3), (1, 1), (1, 1), (1, 1), 4, False),  # depthwise
]
def conv_case_id(case):
    B, ci, co, hw, k, s, p, d, g, bias = case
    return f"B{B}-{ci}to{co}-k{k[0]}{k[1]}-s{s[0]}{s[1]}-p{p[0]}{p[1]}-d{d[0]}{d[1]}-g{g}" + \
        ("-bias" if bias else "")


def conv_inputs(case, dtype, device, seed=0, batch=None):
    B, C_in, C_out, hw, k, s, p, d, g, bias = case
    B = batch or B
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(B, C_in, *hw, generator=gen, dtype=torch.float64)
    H_out = (hw[0] + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    W_out = (hw[1] + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    E = torch.randn(B, C_out, H_out, W_out, generator=gen, dtype=torch.float64)
    return X.to(device=device, dtype=dtype), E.to(device=device, dtype=dtype)


def conv_geometry(case):
    return dict(kernel_size=case[4], stride=case[5], padding=case[6], dilation=case[7],
                groups=case[8], bias=case[9])
