"""Smooth-Chamfer speed: each backend against the reference and the GEMM floor, same run.

CPU: COCO 1K shape (1,000 images x 5,000 captions, K=4, D=1024), fp32.
GPU (marked gpu): COCO 5K shape (5,000 x 25,000) and the training shape (200 x 1,000 sets)
forward+backward, per dtype (bf16, fp16, fp32, tf32), each Triton tile table apart.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from dive.ops import available_backends, smooth_chamfer

K, D = 4, 1024


def sets(n, dtype=torch.float32, device="cpu", d=D):
    return F.normalize(torch.randn(n, K, d, device=device), dim=-1).to(dtype)


@pytest.fixture(scope="module")
def coco1k():
    torch.manual_seed(0)
    return sets(1000), sets(5000)


def test_cpu_gemm_floor(benchmark, record, coco1k):
    x, y = coco1k
    x2, y2 = x.reshape(-1, D), y.reshape(-1, D)
    benchmark(torch.mm, x2, y2.T)
    record("cpu coco1k fp32 forward", "torch.mm (floor)", "floor")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_cpu_smooth_chamfer(benchmark, record, memory, coco1k, backend):
    x, y = coco1k
    if backend == "torch":
        benchmark.pedantic(smooth_chamfer, (x, y), {"backend": backend}, rounds=2, iterations=1)
    else:
        benchmark(smooth_chamfer, x, y, backend=backend)
    record("cpu coco1k fp32 forward", f"smooth_chamfer[{backend}]",
           "ref" if backend == "torch" else "kernel",
           extra_mb=memory.cpu_extra_mb(1000, 5000, K, D, backend))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_cpu_training_step(benchmark, record, backend):
    x, y = sets(200).requires_grad_(), sets(1000).requires_grad_()

    def step():
        smooth_chamfer(x, y, backend=backend).sum().backward()

    benchmark(step)
    record("cpu train 200x1000 fwd+bwd", f"smooth_chamfer[{backend}]",
           "ref" if backend == "torch" else "kernel")


# ----------------------------------------------------------------------------- GPU
# Every backend x dtype x shape class that dispatch.json chooses between, each shipped Triton
# tile table apart, against the GEMM floor of the same run. Tiny sizes on CPU in the dry run.

GPU_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
              "tf32": torch.float32}
_CUDA = torch.cuda.is_available()
GALLERY = (5000, 25000) if _CUDA else (3, 5)
TRAIN = (200, 1000) if _CUDA else (2, 3)
GPU_D = D if _CUDA else 32


def _tables():
    try:
        from dive.kernels import smooth_chamfer as module
    except ImportError:  # no triton: its benchmarks skip
        return ["default"]
    return sorted(module.SHIPPED_TILES, key=lambda name: name != "default")


# (backend, Triton tile table or None); the reference only for bf16 in the quick run.
BACKENDS = [("triton", t) for t in _tables()] + [("cuda", None), ("torch", None)]


def _params(dtypes, ref_quick=("bf16",)):
    return [pytest.param(dt, b, t, id=f"{dt}-{b}" + (f":{t}" if t not in (None, "default") else ""),
                         marks=[pytest.mark.quick] if b != "torch" or dt in ref_quick else [])
            for dt in dtypes for b, t in BACKENDS]


def _name(backend, table):
    return f"smooth_chamfer[{backend}]" if table in (None, "default") else \
        f"smooth_chamfer[{backend}:{table}]"


@contextlib.contextmanager
def _matmul_tf32(on):
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@contextlib.contextmanager
def _setting(gpu, dtype, backend, table):
    """TF32 on for "tf32", and the Triton tile table under test."""
    with _matmul_tf32(dtype == "tf32"), \
            (gpu.tiles("smooth_chamfer", table) if backend == "triton" else
             contextlib.nullcontext()):
        yield


def _skip_unless_available(backend, device):
    if backend not in available_backends("smooth_chamfer", device):
        pytest.skip(f"backend {backend} not available")


@pytest.fixture(scope="module")
def coco5k():
    torch.manual_seed(0)
    device = "cuda" if _CUDA else "cpu"
    return {name: (sets(GALLERY[0], dt, device, GPU_D), sets(GALLERY[1], dt, device, GPU_D))
            for name, dt in GPU_DTYPES.items() if name != "tf32"}


@pytest.mark.gpu
@pytest.mark.quick
@pytest.mark.parametrize("dtype", list(GPU_DTYPES))
def test_gpu_gemm_floor(benchmark, record, gpu, coco5k, dtype):
    x, y = coco5k["fp32" if dtype == "tf32" else dtype]
    x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    with _matmul_tf32(dtype == "tf32"):
        gpu.time(benchmark, lambda: torch.mm(x2, y2.T))
    record(f"gpu coco5k {dtype} forward", "torch.mm (floor)", "floor")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,backend,table", _params(GPU_DTYPES))
def test_gpu_smooth_chamfer(benchmark, record, gpu, coco5k, dtype, backend, table):
    _skip_unless_available(backend, gpu.device)
    x, y = coco5k["fp32" if dtype == "tf32" else dtype]
    fn = lambda: smooth_chamfer(x, y, backend=backend)  # noqa: E731
    with _setting(gpu, dtype, backend, table):
        gpu.time(benchmark, fn)
        extra_mb = gpu.extra_mb(fn)  # the memory of the path that was timed
    record(f"gpu coco5k {dtype} forward", _name(backend, table),
           "ref" if backend == "torch" else "kernel", extra_mb=extra_mb)


def _train_sets(dtype, device):
    dt = GPU_DTYPES[dtype]
    return (sets(TRAIN[0], dt, device, GPU_D).requires_grad_(),
            sets(TRAIN[1], dt, device, GPU_D).requires_grad_())


@pytest.mark.gpu
@pytest.mark.quick
@pytest.mark.parametrize("dtype", list(GPU_DTYPES))
def test_gpu_training_floor(benchmark, record, gpu, dtype):
    # The three GEMMs of an unfused step: the cosines, then dx = G Y and dy = G^T X.
    x, y = (t.detach().reshape(-1, GPU_D) for t in _train_sets(dtype, gpu.device))
    g = torch.randn(x.shape[0], y.shape[0], device=gpu.device).to(x.dtype)
    with _matmul_tf32(dtype == "tf32"):
        gpu.time(benchmark, lambda: (torch.mm(x, y.T), torch.mm(g, y), torch.mm(g.T, x)))
    record(f"gpu train 200x1000 {dtype} fwd+bwd", "torch.mm x3 (floor)", "floor")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,backend,table", _params(GPU_DTYPES, ref_quick=GPU_DTYPES))
def test_gpu_training_step(benchmark, record, gpu, dtype, backend, table):
    _skip_unless_available(backend, gpu.device)
    x, y = _train_sets(dtype, gpu.device)

    def step():
        smooth_chamfer(x, y, backend=backend).sum().backward()

    with _setting(gpu, dtype, backend, table):
        gpu.time(benchmark, step)
        extra_mb = gpu.extra_mb(step)
    record(f"gpu train 200x1000 {dtype} fwd+bwd", _name(backend, table),
           "ref" if backend == "torch" else "kernel", extra_mb=extra_mb)
