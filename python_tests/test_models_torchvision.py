"""torchvision models from their constructors (random weights, no download), float64: Capture
against torch.func per-sample gradients, and 20 steps of FNGD, SENG, KFAC and TWA.
ResNet-18 (torchvision.models.resnet18, full width, on 32×32 images: the Capture test), the
same ResNet-18 at 1/8 width on 16×16 images (the optimizer tests: torchvision fixes
BasicBlock widths at 64-128-256-512, whose 11.2M float64 parameters and 4608² KFAC factors
take 20 s to 8 min per optimizer on 2 cores), and MobileNetV3-small (depthwise convs,
squeeze-excite convs with biases, Hardswish). torchvision's native ops cannot load next to
the CPU torch here; its model zoo is pure Python (see model_checks.import_torchvision)."""
import pytest
import torch
import torch.nn.functional as F

from model_checks import F64, check_capture, check_optimizer, import_torchvision

C = 5


def _images(B, size=32):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, 3, size, size, generator=g, dtype=F64),
            torch.randint(0, C, (B,), generator=g))


def _small_images(B):
    return _images(B, 16)


def _losses(model, x, y):
    return F.cross_entropy(model(x), y, reduction="none")


def _model(name, **kw):
    def build():
        models = import_torchvision().models
        return getattr(models, name)(num_classes=C, **kw).to(F64).eval()
    return build


def _narrow_resnet18(div=8):
    """torchvision's ResNet-18 — its ResNet class, BasicBlock, _make_layer (the strided 1×1
    downsample branches), forward and initialization — with every width divided by div
    (8-16-32-64 channels for div = 8): planes go through torchvision's own _make_layer
    divided, and the stem and head are rebuilt at the narrow width the same way ResNet does."""
    resnet = import_torchvision().models.resnet

    class NarrowResNet(resnet.ResNet):
        def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
            if planes == 64:  # layer1: the stem's width, set to 64 by ResNet.__init__
                self.inplanes = 64 // div
            return super()._make_layer(block, planes // div, blocks, stride, dilate)

    model = NarrowResNet(resnet.BasicBlock, [2, 2, 2, 2], num_classes=C)
    model.conv1 = torch.nn.Conv2d(3, 64 // div, kernel_size=7, stride=2, padding=3, bias=False)
    torch.nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.bn1 = model._norm_layer(64 // div)
    model.fc = torch.nn.Linear(512 // div, C)
    return model.to(F64).eval()


MODELS = {
    "resnet18": (_model("resnet18"), _images, _losses),
    "resnet18_narrow": (_narrow_resnet18, _small_images, _losses),
    "mobilenet_v3_small": (_model("mobilenet_v3_small", width_mult=0.25), _images, _losses),
}
LR = {"FNGD": 0.05, "SENG": 0.05, "KFAC": 0.05, "TWA": 0.05}


@pytest.mark.parametrize("name", MODELS)
def test_capture_matches_per_sample_gradients(name, one_thread):
    check_capture(*MODELS[name])


def test_narrow_resnet18_is_resnet18():
    """The narrow model has ResNet-18's modules in the same order and kinds (the same
    BasicBlocks and downsample branches), each conv at 1/8 of torchvision's width."""
    full, narrow = MODELS["resnet18"][0](), MODELS["resnet18_narrow"][0]()
    assert isinstance(narrow, type(full))  # a subclass of torchvision's ResNet
    kinds = [(n, type(m)) for n, m in full.named_modules()][1:]
    assert kinds == [(n, type(m)) for n, m in narrow.named_modules()][1:]
    for (n, a), (_, b) in zip(full.named_modules(), narrow.named_modules()):
        if isinstance(a, torch.nn.Conv2d):
            assert (b.in_channels, b.out_channels) == (
                a.in_channels // (8 if a.in_channels > 3 else 1), a.out_channels // 8), n


@pytest.mark.parametrize("method", ["FNGD", "SENG", "KFAC", "TWA"])
@pytest.mark.parametrize("name", ["resnet18_narrow", "mobilenet_v3_small"])
def test_optimizer_lowers_the_loss(name, method, one_thread):
    check_optimizer(method, *MODELS[name], lr=LR[method])
