"""The static sm_90 profile (bench/static_profile.py) of every GPU kernel at the benchmark shapes:
per kernel, tensor-core instructions in every GEMM-like kernel (bf16 and TF32), 0 spill bytes,
≥ 132 active CTAs (one full wave of an H100/H200), no fp64 instruction inside a loop — unless
the failure is listed, with its reason, in static_profile.WAIVERS. No GPU needed: the kernels
are compiled (Triton, nvcc) and their SASS read. A cold run compiles ~130 kernels (a few
minutes on 2 cores); with Triton's cache and the profile's own cache warm it takes seconds."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "bench" / "static_profile.py"


def _tool():
    spec = importlib.util.spec_from_file_location("static_profile", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   DADD R2, R4, R6 ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0030*/                   DFMA R8, R2, R2, R8 ;
        /*0040*/                   CALL.REL.NOINC 0x100 ;
        /*0050*/              @P0  BRA 0x20 ;
        /*0060*/                   F2F.F64.F32 R2, R3 ;
        /*0070*/                   EXIT ;
"""


def test_sass_analysis_finds_loops_tensor_cores_and_fp64():
    report = _tool().analyze_sass(SASS)
    assert report["tensor_core"] == 1
    assert report["fp64"] == 3  # DADD, DFMA, F2F.F64
    assert report["fp64_in_loops"] == 1  # only DFMA lies in the loop 0x20..0x50
    assert report["calls_in_loops"] == 1


def test_checks_and_waivers():
    tool = _tool()
    row = {"op": "x", "shape": "s", "mode": "bf16", "kernel": "m:_gram_token_pair_kernel",
           "gemm_like": True, "tensor_core": 0, "spill_bytes": 8, "active_ctas": 10,
           "fp64_in_loops": 2}
    assert tool.failures(row) == ["tensor_cores", "no_spills", "full_wave", "no_fp64_in_loops"]
    assert tool.failures({**row, "mode": "fp32", "tensor_core": 0, "spill_bytes": 0,
                          "active_ctas": 132, "fp64_in_loops": 0}) == []


def test_every_kernel_passes_the_static_profile(tmp_path):
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(TOOL), "--check", "--out",
                          str(tmp_path / "profile")], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    rows = json.loads((tmp_path / "profile.json").read_text())
    kernels = {row["kernel"] for row in rows}
    # Every Triton kernel of the package is in the profile.
    sys.path.insert(0, str(ROOT / "python_tests"))
    import triton_compile
    expected = {f"{module}:{name}" for module, names in triton_compile.kernels_by_module().items()
                for name in names}
    assert expected <= kernels, sorted(expected - kernels)


def test_committed_table_passes():
    """The committed bench/results/static_profile_sm90.json has no unwaived failure."""
    tool = _tool()
    rows = json.loads((ROOT / "bench" / "results" / "static_profile_sm90.json").read_text())
    unwaived, _, _ = tool.verdict(rows)
    assert not unwaived, [(row["kernel"], row["shape"], row["mode"], check)
                          for row, check in unwaived][:20]
