"""FNGD and SENG learn scikit-learn's digits (real 8×8 images): with the settings of
examples/train_digits.py and fixed seeds, the MLP reaches >= 92% test accuracy within 3
epochs (runs here, 1 thread: FNGD 95.0%, SENG 94.7% after epoch 3; SGD with momentum 95.6%)
and its batch loss falls by 5× or more (2.29 -> 0.19 / 0.21)."""
import importlib.util
import os

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(os.path.dirname(HERE), "examples", "train_digits.py")

EPOCHS = 3
TARGET = 0.92


def _example():
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    """The example module and the data; one torch thread meanwhile (tiny models: more threads
    only spin against other processes on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    module = _example()
    yield module, module.load_digits()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("optimizer", ["fngd", "seng"])
def test_reaches_target_accuracy_on_digits(example, optimizer):
    module, data = example
    history = module.train("mlp", optimizer, EPOCHS, data, seed=0, progress=False)
    assert history["fallbacks"] == 0
    assert max(history["test_acc"]) >= TARGET, history["test_acc"]
    assert history["loss"][-1] < history["loss"][0] / 5
