"""Test set-up: without a GPU, Triton kernels run under the interpreter on CPU tensors.

GPU-only tests carry the `cuda` marker and are skipped, with the reason, where no GPU is.
"""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before the first Triton kernel is imported (lowrank_kernels imports them
    # lazily, on first use).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import lowrank_kernels  # noqa: E402,F401  (registers the ops)
from lowrank_kernels._registry import REGISTRY, unavailable_reason  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-matrix tests (more threads only contend on a
    shared 2-core machine, making such files several times slower); restored afterwards.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def backends_for(op, device, dtype=torch.float32):
    """The backends of `op` that can run on (device, dtype) here."""
    spec = REGISTRY[op]
    return [b for b in spec.backends if unavailable_reason(spec, b, device, dtype) is None]


def device_backend_params(op):
    """pytest params (device, backend) for every backend of op that runs here."""
    return [pytest.param(d, b, id=f"{d}-{b}", marks=[pytest.mark.cuda] if d == "cuda" else [])
            for d in DEVICES for b in backends_for(op, d)]


def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true", default=False,
                     help="test_fuzz_ops: the long property-based fuzz run (>= 20,000 cases) "
                          "instead of the CI one (>= 1,000)")


@pytest.fixture(scope="session")
def fuzz_long(request):
    """True under --fuzz-long (test_fuzz_ops sizes its example counts by it)."""
    return request.config.getoption("--fuzz-long")
