"""The torch-free host/device kernel cores (csrc/include/lowrank/*_core.h) pass their C++
tests (csrc/tests/test_*.cpp), built with CMake and run by ctest."""
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ctest_of_kernel_cores(tmp_path):
    if shutil.which("cmake") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("cmake not found: CI must run the C++ core tests (pip install cmake)")
        pytest.skip("cmake not installed")
    build = tmp_path / "build"
    for cmd in (["cmake", "-S", str(ROOT), "-B", str(build), "-DLOWRANK_BUILD_EXTENSION=OFF"],
                ["cmake", "--build", str(build), "-j", "2"],
                ["ctest", "--test-dir", str(build), "--output-on-failure"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "tests passed" in proc.stdout
