"""Float64 oracles for the optimizer tests: tiny models, explicit per-sample gradients through
torch.func (vmap(grad)), and dense (F + λI)⁻¹ ḡ solves, F = U Uᵀ / B."""
import torch
import torch.nn.functional as F
from torch import nn


def mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def cnn(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 2, stride=2),
                         nn.Tanh(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3)).to(dtype)


def batch(model, B, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shape = (B, 5) if isinstance(model[0], nn.Linear) else (B, 2, 5, 5)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randint(0, 3, (B,), generator=g)


def per_sample_grads(model, x, y):
    """{name: (B, *shape)} of g_i = ∇ℓ_i, ℓ_i the cross-entropy of sample i."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi[None],))
        return F.cross_entropy(out, yi[None])

    return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)


def blocks(model, by_layer=True):
    """[[param names]] per module (or one block for the model)."""
    names = [n for n, _ in model.named_parameters()]
    if not by_layer:
        return [names]
    out = {}
    for n in names:
        out.setdefault(n.rsplit(".", 1)[0], []).append(n)
    return list(out.values())


def stacked(grads, names):
    """U as (B, D) for the named parameters."""
    return torch.cat([grads[n].flatten(1) for n in names], 1)


def natural_gradient(U, lam, v=None):
    """(F + λI)⁻¹ v with F = UᵀU/B for U (B, D) (rows g_i); v defaults to ḡ. Dense solve."""
    B, D = U.shape
    Fm = U.T @ U / B
    v = U.mean(0) if v is None else v
    return torch.linalg.solve(Fm + lam * torch.eye(D, dtype=U.dtype), v)


def split(vector, grads, names):
    out, k = {}, 0
    for n in names:
        shape = grads[n].shape[1:]
        size = shape.numel()
        out[n] = vector[k:k + size].reshape(shape)
        k += size
    return out


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()
