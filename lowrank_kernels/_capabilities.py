"""Build and device gates, in one place: what is built, what can run where."""
import functools
import importlib
import importlib.util
import os

import torch


@functools.cache
def _native_import():
    """(module, error): the native extension lowrank_kernels._C, or why it did not load."""
    try:
        return importlib.import_module("lowrank_kernels._C"), None
    except ImportError as exc:  # not built (LOWRANK_BUILD_CPP=0) or built for another torch
        return None, str(exc)


def native_built() -> bool:
    """True when lowrank_kernels._C is importable (its ops are then registered)."""
    return _native_import()[0] is not None


def native_import_error() -> str | None:
    return _native_import()[1]


def native_build_info() -> str:
    """'cpu', 'cpu+cuda:<archs>', or 'not built'."""
    module = _native_import()[0]
    return module.build_info() if module is not None else "not built"


def native_has_cuda() -> bool:
    return native_build_info().startswith("cpu+cuda")


@functools.cache
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreter() -> bool:
    """Triton kernels run on CPU tensors only under its interpreter (TRITON_INTERPRET=1,
    which must be set before the first Triton kernel is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cuda_available() -> bool:
    return torch.cuda.is_available()


def triton_version() -> str | None:
    if not has_triton():
        return None
    import triton

    return triton.__version__
