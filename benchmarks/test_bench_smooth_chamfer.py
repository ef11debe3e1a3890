"""Smooth-Chamfer speed: each backend against the reference and the GEMM floor, same run.

CPU: COCO 1K shape (1,000 images x 5,000 captions, K=4, D=1024), fp32.
GPU (marked gpu): COCO 5K shape (5,000 x 25,000) per dtype, and the training shape
(200 x 1,000 sets) forward+backward.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from dive.ops import available_backends, smooth_chamfer

K, D = 4, 1024


def sets(n, dtype=torch.float32, device="cpu"):
    return F.normalize(torch.randn(n, K, D, device=device), dim=-1).to(dtype)


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

GPU_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
              "tf32": torch.float32}


@contextlib.contextmanager
def _matmul_tf32(on):
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def _cuda_bench(benchmark, fn, tf32):
    def run():
        fn()
        torch.cuda.synchronize()

    with _matmul_tf32(tf32):
        benchmark.pedantic(run, warmup_rounds=2, rounds=10, iterations=1)


@pytest.fixture(scope="module")
def coco5k():
    torch.manual_seed(0)
    return {name: (sets(5000, dt, "cuda"), sets(25000, dt, "cuda"))
            for name, dt in GPU_DTYPES.items() if name != "tf32"}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(GPU_DTYPES))
def test_gpu_gemm_floor(benchmark, record, coco5k, dtype):
    x, y = coco5k["fp32" if dtype == "tf32" else dtype]
    x2, y2 = x.reshape(-1, D), y.reshape(-1, D)
    _cuda_bench(benchmark, lambda: torch.mm(x2, y2.T), tf32=dtype == "tf32")
    record(f"gpu coco5k {dtype} forward", "torch.mm (floor)", "floor")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("dtype", list(GPU_DTYPES))
def test_gpu_smooth_chamfer(benchmark, record, memory, coco5k, dtype, backend):
    if backend not in available_backends("smooth_chamfer", "cuda"):
        pytest.skip(f"backend {backend} not available")
    x, y = coco5k["fp32" if dtype == "tf32" else dtype]
    fn = lambda: smooth_chamfer(x, y, backend=backend)  # noqa: E731
    _cuda_bench(benchmark, fn, tf32=dtype == "tf32")
    with _matmul_tf32(dtype == "tf32"):  # the memory of the path that was timed
        extra_mb = memory.cuda_extra_mb(fn)
    record(f"gpu coco5k {dtype} forward", f"smooth_chamfer[{backend}]",
           "ref" if backend == "torch" else "kernel", extra_mb=extra_mb)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_gpu_training_step(benchmark, record, memory, dtype, backend):
    if backend not in available_backends("smooth_chamfer", "cuda"):
        pytest.skip(f"backend {backend} not available")
    x = sets(200, GPU_DTYPES[dtype], "cuda").requires_grad_()
    y = sets(1000, GPU_DTYPES[dtype], "cuda").requires_grad_()

    def step():
        smooth_chamfer(x, y, backend=backend).sum().backward()

    _cuda_bench(benchmark, step, tf32=False)
    record(f"gpu train 200x1000 {dtype} fwd+bwd", f"smooth_chamfer[{backend}]",
           "ref" if backend == "torch" else "kernel", extra_mb=memory.cuda_extra_mb(step))
