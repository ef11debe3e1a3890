"""Finds the compiled modules and Triton, and reports what this install can run."""
import functools
import importlib
import os

import torch

from . import __version__


@functools.lru_cache(maxsize=None)
def _load(name):
    try:
        return importlib.import_module(f"dive.{name}"), None
    except ImportError as exc:
        return None, str(exc)


def cpu_module():
    """dive._C (C++/OpenMP), or None when the package was not built."""
    return _load("_C")[0]


def cuda_module():
    """dive._C_cuda, or None when it was not built (no nvcc at build time or DIVE_CUDA=0)."""
    return _load("_C_cuda")[0]


@functools.lru_cache(maxsize=None)
def triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def triton_interpreted():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def build_info():
    """What this install was built with and can run, as a plain dict."""
    cpu, cpu_err = _load("_C")
    cuda, cuda_err = _load("_C_cuda")
    info = {
        "dive": __version__,
        "torch": torch.__version__,
        "cpp": cpu is not None,
        "cpp_threads": cpu.num_threads() if cpu else None,
        "cuda": cuda is not None,
        "cuda_archs": cuda.archs.split(";") if cuda else [],
        "cuda_devices": cuda.device_count() if cuda else 0,
        "triton": triton_version(),
        "triton_interpret": triton_interpreted(),
    }
    if cpu is None:
        info["cpp_error"] = cpu_err
    if cuda is None:
        info["cuda_error"] = cuda_err
    return info
