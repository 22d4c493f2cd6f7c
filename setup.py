"""Build lowrank_kernels and its native extension lowrank_kernels._C.

Environment:
  LOWRANK_BUILD_CPP=0     pure-Python install (reference and Triton backends only)
  LOWRANK_BUILD_CUDA=1/0  force the CUDA kernels on/off (default: on when torch has CUDA
                          and a CUDA toolkit is found)
  TORCH_CUDA_ARCH_LIST    archs of the CUDA kernels (default "9.0": sm_90)
GPU install, keeping the user's torch:  pip install --no-build-isolation -e .
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name, default):
    value = os.environ.get(name, default)
    if value not in ("0", "1", "auto"):
        raise SystemExit(f"{name} must be 0, 1 or auto, got {value!r}")
    return value


def _extensions():
    if _flag("LOWRANK_BUILD_CPP", "1") == "0":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    want_cuda = _flag("LOWRANK_BUILD_CUDA", "auto")
    has_toolkit = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    if want_cuda == "1" and not has_toolkit:
        raise SystemExit(
            "LOWRANK_BUILD_CUDA=1 but no usable CUDA toolkit: torch.version.cuda="
            f"{torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}. Install a CUDA build "
            "of torch and the CUDA toolkit, or set LOWRANK_BUILD_CUDA=0."
        )
    build_cuda = want_cuda == "1" or (want_cuda == "auto" and has_toolkit)

    # csrc/<op>.cpp: an op's registration, checks and CPU kernel (its CUDA glue in CUDA
    # builds); csrc/cuda/<op>.cu: its torch-free CUDA kernel; ops.cpp: the Python module.
    sources = sorted(glob.glob("csrc/*.cpp"))
    # One C++ standard for setup.py, CMakeLists.txt and the suite's nvcc check: C++20 (what
    # torch >= 2.13 needs; older torch headers build with it too).
    cxx = ["-O3", "-std=c++20"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if not build_cuda:
        ext = cpp_extension.CppExtension(
            "lowrank_kernels._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx}, py_limited_api=False)
        return [ext], {"build_ext": cpp_extension.BuildExtension}

    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # read by cpp_extension for -gencode
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    # The arch list as one preprocessor token ("8.0;9.0+PTX" -> 8.0_9.0_PTX), stringified in ops.cpp.
    arch_token = "".join(ch if ch.isalnum() or ch == "." else "_" for ch in archs)
    defines = ["-DLOWRANK_WITH_CUDA", f"-DLOWRANK_CUDA_ARCHS={arch_token}"]
    ext = cpp_extension.CUDAExtension(
        "lowrank_kernels._C", sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx + defines,
                            "nvcc": ["-O3", "-std=c++20"] + defines})
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="lowrank_kernels",
    version="0.1.0",
    description="Fused Triton and C++/CUDA kernels for second-order and subspace training",
    packages=find_packages(include=["lowrank_kernels", "lowrank_kernels.*"]),
    python_requires=">=3.10",
    # torch is not listed: the user's torch (CPU or CUDA build) is used as it is.
    install_requires=["numpy"],
    extras_require={"triton": ["triton>=3.6"],
                    "test": ["pytest", "pytest-benchmark", "ninja", "pybind11"],
                    "bench": ["pytest-benchmark", "matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
