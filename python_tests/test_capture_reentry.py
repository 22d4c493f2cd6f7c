"""One Capture entered for batch after batch (a training loop's `with cap:` each step): its
hooks are built at the first entry and kept, so every entry must record exactly that
entry's batch — the Gram of each batch against torch.func per-sample gradients in float64 —
and a module recognized by what it computes (a per-channel scale, checked on its first
call) is checked once per Capture, not once per entry."""
import pytest
import torch
from test_capture_models import F64, batch, close, flat, make, per_sample_grads, sample_loss
from torch import nn

from lowrank_kernels.capture import Capture
from lowrank_kernels.capture import _generic


class LayerScale(nn.Module):
    """y = x ⊙ gamma: no handler of its own type; recognized by what it computes."""

    def __init__(self, d):
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.gamma


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = make("mlp")
        self.scale = LayerScale(3)

    def forward(self, x):
        return self.scale(self.inner(x))


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer", "scaled"])
def test_each_entry_records_its_own_batch(name, monkeypatch):
    checks = []
    verify = _generic.AffineHandler.verify
    monkeypatch.setattr(_generic.AffineHandler, "verify",
                        lambda self, *a: checks.append(self.name) or verify(self, *a))
    model = Scaled().to(F64) if name == "scaled" else make(name)
    kind = "mlp" if name == "scaled" else name
    cap = Capture(model, keep=True, backend="reference")
    for seed, B in ((1, 5), (2, 3), (3, 5)):
        x, t = batch(kind, B, seed=seed)
        model.zero_grad()
        with cap:
            sample_loss(kind, model(x), t).mean().backward()
        U = flat(per_sample_grads(model, kind, x, t))
        close(cap.gram(), U @ U.T, f"{name}, entry with batch seed {seed}")
    assert checks == (["scale"] if name == "scaled" else [])
