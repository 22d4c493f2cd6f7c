"""lowrank_kernels: fused kernels for second-order and subspace training.

Ops live in torch.ops.lowrank_kernels (declared once; the dispatcher picks the CPU or CUDA
kernel); the functions below are their Python entry points. `python -m lowrank_kernels` prints the
build and the backend each op uses on each device.
"""
from ._capabilities import native_build_info
from ._registry import (BACKENDS, REGISTRY, BackendUnavailableError, NonFiniteError,
                        choose_backend, strict, use_backend)
from .ops import *  # noqa: F401,F403  (every public op)
from .ops import __all__ as _ops_all
from .sketch import *  # noqa: F401,F403  (range finder, randomized SVD/eigh, per-sample sketches)
from .sketch import __all__ as _sketch_all
from .capture import Capture
from .natural_gradient import NGSolveResult, ng_solve

__version__ = "0.1.0"

from ._registry import _environment_mode

_environment_mode()  # LOWRANK_BACKEND / LOWRANK_STRICT set before the import

__all__ = ["BACKENDS", "REGISTRY", "BackendUnavailableError", "NonFiniteError", "choose_backend",
           "strict", "use_backend",
           "native_build_info", "Capture", "NGSolveResult", "ng_solve", *_ops_all,
           *_sketch_all]
