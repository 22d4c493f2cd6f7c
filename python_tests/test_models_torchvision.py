"""torchvision models from their constructors (random weights, no download), float64, on
32×32 images: Capture against torch.func per-sample gradients, and 20 steps of FNGD, SENG,
KFAC and TWA. ResNet-18, and MobileNetV3-small (depthwise convs, squeeze-excite convs with
biases, Hardswish). torchvision's native ops cannot load next to the CPU torch here; its
model zoo is pure Python (see model_checks.import_torchvision)."""
import os

import pytest
import torch
import torch.nn.functional as F

from model_checks import F64, check_capture, check_optimizer, import_torchvision

C = 5


def _images(B):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, 3, 32, 32, generator=g, dtype=F64),
            torch.randint(0, C, (B,), generator=g))


def _losses(model, x, y):
    return F.cross_entropy(model(x), y, reduction="none")


def _model(name, **kw):
    def build():
        models = import_torchvision().models
        return getattr(models, name)(num_classes=C, **kw).to(F64).eval()
    return build


MODELS = {
    "resnet18": (_model("resnet18"), _images, _losses),
    "mobilenet_v3_small": (_model("mobilenet_v3_small", width_mult=0.25), _images, _losses),
}
LR = {"FNGD": 0.05, "SENG": 0.05, "KFAC": 0.05, "TWA": 0.05}


@pytest.mark.parametrize("name", MODELS)
def test_capture_matches_per_sample_gradients(name, one_thread):
    check_capture(*MODELS[name])


FULL = os.environ.get("LK_SLOW_TESTS") == "1"


@pytest.mark.parametrize("method", ["FNGD", "SENG", "KFAC", "TWA"])
@pytest.mark.parametrize("name", MODELS)
def test_optimizer_lowers_the_loss(name, method, one_thread):
    if name == "resnet18" and not FULL:
        pytest.skip("ResNet-18 has 11.2M float64 parameters and torchvision fixes its widths: "
                    "20 steps take 20 s (FNGD, SENG, TWA) to 8 min (KFAC: 4608² factors) on 2 "
                    "cores; LK_SLOW_TESTS=1 runs them (its Capture test always runs)")
    check_optimizer(method, *MODELS[name], lr=LR[method])
