"""The build's choices (DIVE_CUDA, DIVE_CUDA_ARCHS, CUDA_HOME) and what the install reports."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dive

ROOT = Path(__file__).resolve().parents[1]
# Runs setup.py with setuptools.setup replaced, printing the extensions it would build.
PLAN = ("import runpy, setuptools; "
        "setuptools.setup = lambda **kw: print([(e.name, getattr(e, 'gencode', None)) "
        "for e in kw['ext_modules']]); runpy.run_path('setup.py')")


def plan(**env):
    full = {k: v for k, v in os.environ.items()
            if k not in ("DIVE_CUDA", "DIVE_CUDA_ARCHS", "CUDA_HOME", "CUDA_PATH")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", PLAN], cwd=ROOT, env=full, capture_output=True,
                          text=True)


def test_dive_cuda_0_builds_only_the_cpu_module():
    done = plan(DIVE_CUDA="0")
    assert done.returncode == 0, done.stderr
    assert "dive._C'" in done.stdout and "dive._C_cuda" not in done.stdout


def test_dive_cuda_1_without_a_toolkit_is_a_clear_error():
    done = plan(DIVE_CUDA="1", CUDA_HOME="/nonexistent")
    assert done.returncode != 0
    assert "DIVE_CUDA=1 but no CUDA toolkit" in done.stderr


def test_bad_dive_cuda_value_is_named():
    done = plan(DIVE_CUDA="yes")
    assert done.returncode != 0 and "DIVE_CUDA must be auto, 0 or 1" in done.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_archs_become_gencode_flags():
    done = plan(DIVE_CUDA="1", DIVE_CUDA_ARCHS="8.6;9.0+PTX")
    assert done.returncode == 0, done.stderr
    assert "code=sm_86" in done.stdout and "code=sm_90" in done.stdout
    assert "code=compute_90" in done.stdout and "sm_80" not in done.stdout
    bad = plan(DIVE_CUDA="1", DIVE_CUDA_ARCHS="eighty")
    assert bad.returncode != 0 and "DIVE_CUDA_ARCHS: cannot read 'eighty'" in bad.stderr


def test_build_info_names_what_was_built():
    info = dive.build_info()
    assert info["cpp"] is True and info["cpp_threads"] >= 1
    assert info["triton"] is None or info["triton"][0].isdigit()
    if os.environ.get("DIVE_CUDA") == "1":  # CI builds the CUDA module and must have it
        assert info["cuda"] is True, info.get("cuda_error")


def test_cuda_module_imports_without_a_gpu():
    if not dive.build_info()["cuda"]:
        pytest.skip("dive._C_cuda was not built here")
    import dive._C_cuda as cuda

    assert set(cuda.archs.split(";")) and cuda.max_set_size == 32
    assert cuda.device_count() == torch.cuda.device_count()
