"""Finds the compiled modules and Triton, and reports what this install can run."""
import importlib
import importlib.metadata
import os

import torch

from . import __version__


def _load(name):
    try:
        return importlib.import_module(f"dive.{name}"), None
    except ImportError as exc:
        return None, str(exc)


def _installed_version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# Looked up once at import so that dispatch, which runs under torch.compile tracing, only reads
# constants. Triton's version comes from its metadata: importing it here would be slow.
_CPU, _CPU_ERROR = _load("_C")
_CUDA, _CUDA_ERROR = _load("_C_cuda")
_TRITON = _installed_version("triton")


def cpu_module():
    """dive._C (C++/OpenMP), or None when the package was not built."""
    return _CPU


def cuda_module():
    """dive._C_cuda, or None when it was not built (no nvcc at build time or DIVE_CUDA=0)."""
    return _CUDA


def triton_version():
    return _TRITON


def triton_interpreted():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def build_info():
    """What this install was built with and can run, as a plain dict."""
    cpu, cuda = _CPU, _CUDA
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
        info["cpp_error"] = _CPU_ERROR
    if cuda is None:
        info["cuda_error"] = _CUDA_ERROR
    return info
