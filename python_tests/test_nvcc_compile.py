"""Every csrc/**/*.cu compiles with nvcc for sm_90 (objects only), so a CUDA build break is
caught on machines without a GPU. The .cu files are torch-free (raw pointers), so the CUDA
toolkit's own headers are all they need. In CI (CI=true) a missing nvcc is a failure."""
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc").rglob("*.cu"))


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (pathlib.Path(home) / "bin" / "nvcc").exists():
            return str(pathlib.Path(home) / "bin" / "nvcc")
    return None


NVCC = _nvcc()


def test_there_are_cuda_sources():
    assert CU_FILES, "no .cu files under csrc/"


@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: str(p.relative_to(ROOT / "csrc")))
def test_cu_compiles_for_sm90(source, tmp_path):
    if NVCC is None:
        if os.environ.get("CI") == "true":
            pytest.fail("nvcc not found: CI must compile every .cu (install the CUDA toolkit)")
        pytest.skip("nvcc not found on this machine")
    cmd = [NVCC, "-c", "-std=c++17", "-O2", "-arch=sm_90", f"-I{ROOT / 'csrc' / 'include'}",
           f"-I{source.parent}", str(source), "-o", str(tmp_path / (source.stem + ".o"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed on {source.name}:\n{proc.stderr[-4000:]}"
