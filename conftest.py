"""Shared by tests/ and benchmarks/ (pytest runs with --import-mode=importlib, so this folder is
not put on sys.path and `import dive` finds the installed package)."""
import os

import pytest
import torch

# Triton kernels run on CPU tensors under the interpreter where there is no GPU. The variable is
# read when a kernel is decorated, so it must be set before dive.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dive  # noqa: E402

if not dive.build_info()["cpp"]:
    # Usually `python -m pytest` from the repo root, which imports the unbuilt source tree.
    pytest.exit(f"dive was imported from {dive.__path__[0]} without its compiled module "
                "dive._C: install the package (pip install .) and run `pytest`", returncode=2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    # benchmarks/gpu_check.sh's dry run (DIVE_GPU_CHECK_DRY=1) times the GPU benchmarks on CPU
    # at tiny sizes, so CI runs them; GPU tests still skip.
    dry = os.environ.get("DIVE_GPU_CHECK_DRY") == "1"
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not (dry and "benchmark" in item.fixturenames):
            item.add_marker(skip)


@pytest.fixture
def seed():
    """Fresh random inputs each run; DIVE_TEST_SEED replays a failure (the seed is in messages)."""
    value = int(os.environ.get("DIVE_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(value)
    return value
