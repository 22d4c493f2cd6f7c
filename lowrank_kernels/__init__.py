"""lowrank_kernels: fused kernels for second-order and subspace training.

Ops live in torch.ops.lowrank_kernels (declared once, with fake, CPU and CUDA kernels);
the functions below are their Python entry points. `python -m lowrank_kernels` prints the
build and the backend each op uses on each device.
"""
from ._capabilities import native_build_info
from ._registry import BACKENDS, REGISTRY, BackendUnavailableError, choose_backend
from .ops import *  # noqa: F401,F403  (every public op)
from .ops import __all__ as _ops_all
from .sketch import *  # noqa: F401,F403  (range finder, randomized SVD/eigh, per-sample sketches)
from .sketch import __all__ as _sketch_all
from .capture import Capture
from .natural_gradient import NGSolveResult, ng_solve

__version__ = "0.1.0"

__all__ = ["BACKENDS", "REGISTRY", "BackendUnavailableError", "choose_backend",
           "native_build_info", "Capture", "NGSolveResult", "ng_solve", *_ops_all,
           *_sketch_all]
