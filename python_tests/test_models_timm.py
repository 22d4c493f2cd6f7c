"""timm models built from tiny configs (random weights, no download), float64: Capture against
torch.func per-sample gradients, and 20 steps of FNGD, SENG, KFAC and TWA. ViT-tiny (img 32,
patch 8: cls_token and pos_embed used directly), ConvNeXt-atto (LayerNorm2d over channels,
timm LayerNorm, depthwise 7×7 convs, layer-scale gamma), EfficientNet-B0 (BatchNormAct2d,
depthwise convs, squeeze-excite), and RegNetX-200MF (grouped convs, BatchNormAct2d)."""
import pytest
import torch
import torch.nn.functional as F

from model_checks import F64, check_capture, check_optimizer, import_torchvision

import_torchvision()  # timm imports torchvision (see model_checks.import_torchvision)
timm = pytest.importorskip("timm", reason="timm is a test-only dependency (scripts/install.sh)")

C = 5


def _images(B, size=32):
    def batch(B):
        g = torch.Generator().manual_seed(1)
        return (torch.randn(B, 3, size, size, generator=g, dtype=F64),
                torch.randint(0, C, (B,), generator=g))
    return batch


def _losses(model, x, y):
    return F.cross_entropy(model(x), y, reduction="none")


def _timm(name, **kw):
    def build():
        return timm.create_model(name, pretrained=False, num_classes=C, **kw).to(F64).eval()
    return build


def _efficientnet_b0():
    """EfficientNet-B0's blocks (timm's own generator) at a quarter of its width and depth."""
    from timm.models.efficientnet import _gen_efficientnet
    return _gen_efficientnet("efficientnet_b0", channel_multiplier=0.25, depth_multiplier=0.25,
                             pretrained=False, num_classes=C).to(F64).eval()


def _regnetx():
    """RegNetX-200MF's design (timm's RegNet, grouped 3×3 convs) at 8 blocks, widths 8–64."""
    from timm.models.regnet import RegNet, RegNetCfg
    cfg = RegNetCfg(depth=8, w0=8, wa=8.0, wm=2.0, group_size=4)
    return RegNet(cfg, num_classes=C).to(F64).eval()


MODELS = {
    "vit_tiny": (_timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                       embed_dim=32, num_heads=2), _images(4), _losses),
    "convnext_atto": (_timm("convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32),
                            ls_init_value=0.5), _images(4), _losses),
    "efficientnet_b0": (_efficientnet_b0, _images(4), _losses),
    "regnetx_002": (_regnetx, _images(4), _losses),
}
LR = {"FNGD": 0.05, "SENG": 0.05, "KFAC": 0.05, "TWA": 0.05}


@pytest.mark.parametrize("name", MODELS)
def test_capture_matches_per_sample_gradients(name, one_thread):
    check_capture(*MODELS[name])


@pytest.mark.parametrize("method", ["FNGD", "SENG", "KFAC", "TWA"])
@pytest.mark.parametrize("name", MODELS)
def test_optimizer_lowers_the_loss(name, method, one_thread):
    check_optimizer(method, *MODELS[name], lr=LR[method])
