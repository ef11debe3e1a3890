"""Slot cross-attention speed, forward+backward: each backend against the reference, same run.

Shape of the paper's aggregation block: B=128, H=4, K=4 slots, d=dv=512, N tokens (36 regions;
49 and 64 grid cells). The whole AggregationBlock (depth 4, shared weights) is timed on the fused
op against the same block on the reference op.
CPU: fp32. GPU (marked gpu): bf16, fp16, fp32 and tf32, every N, each Triton tile table apart.
"""
import contextlib

import pytest
import torch

from dive.nn import AggregationBlock
from dive.ops import available_backends, slot_attention

B, H, K, D = 128, 4, 4, 512
TOKENS = (36, 49, 64)


def inputs(n, dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return make(B, H, K, D), make(B, H, n, D), make(B, H, n, D)


def step(q, k, v, backend):
    def run():
        for t in (q, k, v):
            t.grad = None
        slot_attention(q, k, v, backend=backend).sum().backward()
    return run


def block_step(block, tokens):
    def run():
        block.zero_grad(set_to_none=True)
        block(tokens).sum().backward()
    return run


def _role(backend):
    return "ref" if backend == "torch" else "kernel"


@pytest.mark.parametrize("n", TOKENS)
@pytest.mark.parametrize("backend", available_backends("slot_attention", "cpu"))
def test_cpu_slot_attention(benchmark, record, backend, n):
    if backend == "triton":
        pytest.skip("the Triton interpreter is not a CPU backend worth timing")
    benchmark(step(*inputs(n), backend))
    record(f"cpu slot-attn N={n} fp32 fwd+bwd", f"slot_attention[{backend}]", _role(backend))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_cpu_aggregation_block(benchmark, record, backend):
    # A quarter of the batch: at B=128 one step takes seconds on two cores.
    torch.manual_seed(0)
    block = AggregationBlock(1024, 1024, num_slots=K, depth=4, heads=H, head_dim=D,
                             backend=backend)
    benchmark.pedantic(block_step(block, torch.randn(B // 4, 36, 1024)), warmup_rounds=1,
                       rounds=5)
    record(f"cpu AggregationBlock B={B // 4} N=36 fp32 step", f"block[{backend}]",
           _role(backend))


# ----------------------------------------------------------------------------- GPU
# Every backend x dtype that dispatch.json chooses between, each shipped Triton tile table apart,
# against the batched-GEMM floor of the same run (N=36 in the quick run). Tiny sizes on CPU in
# the dry run.

GPU_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
              "tf32": torch.float32}
_CUDA = torch.cuda.is_available()
GPU_SHAPE = (B, H, K, D) if _CUDA else (2, 2, K, 16)  # B, H, K slots, d = dv
GPU_TOKENS = TOKENS if _CUDA else (5,)


def _tables():
    try:
        from dive.kernels import slot_attention as module
    except ImportError:  # no triton: its benchmarks skip
        return ["default"]
    return sorted(module.SHIPPED_TILES, key=lambda name: name != "default")


BACKENDS = [("triton", t) for t in _tables()] + [("cuda", None), ("torch", None)]


def _quick(n):
    return [pytest.mark.quick] if n == GPU_TOKENS[0] else []


def _params():
    return [pytest.param(n, dt, b, t, marks=_quick(n),
                         id=f"N{n}-{dt}-{b}" + (f":{t}" if t not in (None, "default") else ""))
            for n in GPU_TOKENS for dt in GPU_DTYPES for b, t in BACKENDS]


def gpu_inputs(n, dtype, device):
    torch.manual_seed(0)
    b, h, k, d = GPU_SHAPE

    def make(*shape):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_()
    return make(b, h, k, d), make(b, h, n, d), make(b, h, n, d)


@contextlib.contextmanager
def _tf32(on):
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("n", [pytest.param(n, marks=_quick(n)) for n in GPU_TOKENS])
def test_gpu_slot_attention_floor(benchmark, record, gpu, n, dtype):
    # The six batched GEMMs of an unfused step: scores and output, then d(scores) by do v^T,
    # dv = A^T do, dq = ds k, dk = ds^T q.
    q, k, v = (t.detach() for t in gpu_inputs(n, GPU_DTYPES[dtype], gpu.device))
    a = torch.randn(*q.shape[:3], n, device=gpu.device, dtype=q.dtype)

    def gemms():
        return (q @ k.transpose(-1, -2), a @ v, q @ v.transpose(-1, -2), a.transpose(-1, -2) @ q,
                a @ k, a.transpose(-1, -2) @ q)

    with _tf32(dtype == "tf32"):
        gpu.time(benchmark, gemms, rounds=20, warmup_rounds=3, iterations=5)
    record(f"gpu slot-attn N={n} {dtype} fwd+bwd", "torch.matmul x6 (floor)", "floor")


@pytest.mark.gpu
@pytest.mark.parametrize("n,dtype,backend,table", _params())
def test_gpu_slot_attention(benchmark, record, gpu, n, dtype, backend, table):
    if backend not in available_backends("slot_attention", gpu.device):
        pytest.skip(f"{backend} is not available here")
    q, k, v = gpu_inputs(n, GPU_DTYPES[dtype], gpu.device)
    run = step(q, k, v, backend)
    with _tf32(dtype == "tf32"), \
            (gpu.tiles("slot_attention", table) if backend == "triton" else
             contextlib.nullcontext()):
        gpu.time(benchmark, run, rounds=20, warmup_rounds=3, iterations=5)
        extra_mb = gpu.extra_mb(run)
    name = f"slot_attention[{backend}]" if table in (None, "default") else \
        f"slot_attention[{backend}:{table}]"
    record(f"gpu slot-attn N={n} {dtype} fwd+bwd", name, _role(backend), extra_mb=extra_mb)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [pytest.param("bf16", marks=pytest.mark.quick), "fp32"])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_gpu_aggregation_block(benchmark, record, gpu, backend, dtype):
    torch.manual_seed(0)
    b, heads, slots, d = GPU_SHAPE
    width = 1024 if _CUDA else 32
    block = AggregationBlock(width, width, num_slots=slots, depth=4, heads=heads, head_dim=d,
                             backend=backend).to(gpu.device)
    tokens = torch.randn(b, 36 if _CUDA else 5, width, device=gpu.device)

    def run():
        with torch.autocast(gpu.device, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            block_step(block, tokens)()

    gpu.time(benchmark, run, rounds=20, warmup_rounds=3, iterations=5)
    record(f"gpu AggregationBlock N=36 {dtype} step", f"block[{backend}]", _role(backend))
